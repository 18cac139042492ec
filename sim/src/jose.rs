//! The EHR side of SMART client authentication, written independently of the client: JWS
//! compact parsing, RS384 / ES384 verification against a registered JWK Set, and every claim
//! check SMART Backend Services requires. Errors read like an auth server's
//! `error_description`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p384::ecdsa::signature::Verifier;
use serde_json::Value;

/// A client registered with this EHR.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client_id: String,
    /// The client's JWK Set (`{"keys":[…]}`).
    pub jwks: Value,
    /// The JWKS URL the client registered, if it registered by URL; a JWT `jku` must equal it.
    pub jku: Option<String>,
}

/// The claims that passed verification.
#[derive(Debug, Clone)]
pub struct VerifiedAssertion {
    pub client_id: String,
    pub jti: String,
    pub exp: i64,
    pub alg: String,
}

fn decode_json(part: &str, what: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("JWT {what} is not unpadded base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| format!("JWT {what} is not JSON"))
}

fn b64_member(jwk: &Value, member: &str) -> Result<Vec<u8>, String> {
    let text = jwk
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("registered JWK lacks `{member}`"))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| format!("registered JWK `{member}` is not base64url"))
}

fn verify_signature(alg: &str, jwk: &Value, signed: &[u8], signature: &[u8]) -> Result<(), String> {
    match alg {
        "RS384" => {
            let n = rsa::BigUint::from_bytes_be(&b64_member(jwk, "n")?);
            let e = rsa::BigUint::from_bytes_be(&b64_member(jwk, "e")?);
            let public = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("registered RSA key unusable: {e}"))?;
            let key = rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(public);
            let signature =
                rsa::pkcs1v15::Signature::try_from(signature).map_err(|_| "malformed RS384 signature".to_string())?;
            rsa::signature::Verifier::verify(&key, signed, &signature)
                .map_err(|_| "signature verification failed".to_string())
        }
        "ES384" => {
            if jwk.get("crv").and_then(Value::as_str) != Some("P-384") {
                return Err("registered EC key is not on P-384".into());
            }
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            if x.len() != 48 || y.len() != 48 {
                return Err("registered EC key coordinates are not 48 bytes".into());
            }
            let mut uncompressed = Vec::with_capacity(97);
            uncompressed.push(4u8);
            uncompressed.extend_from_slice(&x);
            uncompressed.extend_from_slice(&y);
            let point = p384::EncodedPoint::from_bytes(&uncompressed)
                .map_err(|_| "registered EC key is not a valid point".to_string())?;
            let key = p384::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| "registered EC key is not a valid point".to_string())?;
            // JWS ES384 signatures are the raw 96-byte r||s, not DER.
            let signature = p384::ecdsa::Signature::from_slice(signature)
                .map_err(|_| "malformed ES384 signature (must be 96 raw bytes)".to_string())?;
            key.verify(signed, &signature)
                .map_err(|_| "signature verification failed".to_string())
        }
        other => Err(format!("alg `{other}` is not accepted (RS384 or ES384)")),
    }
}

/// Verifies a client assertion. `lookup` finds a registered client by id; `now` is Unix
/// seconds; `max_lifetime` is how far ahead `exp` may be.
pub fn verify_assertion(
    jwt: &str,
    token_url: &str,
    now: i64,
    max_lifetime: i64,
    lookup: impl Fn(&str) -> Option<RegisteredClient>,
) -> Result<VerifiedAssertion, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("client_assertion is not a compact JWS (three dot-separated parts)".into());
    }
    let header = decode_json(parts[0], "header")?;
    let claims = decode_json(parts[1], "payload")?;
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|_| "JWT signature is not unpadded base64url".to_string())?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("JWT header has no `alg`")?;
    if header.get("typ").and_then(Value::as_str) != Some("JWT") {
        return Err("JWT header `typ` must be `JWT`".into());
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or("JWT header has no `kid`")?;
    let iss = claims.get("iss").and_then(Value::as_str).ok_or("JWT has no `iss`")?;
    let sub = claims.get("sub").and_then(Value::as_str).ok_or("JWT has no `sub`")?;
    if iss != sub {
        return Err("JWT `iss` and `sub` must both be the client_id".into());
    }
    let client = lookup(iss).ok_or_else(|| format!("unknown client `{iss}`"))?;
    match (header.get("jku").and_then(Value::as_str), &client.jku) {
        (Some(jku), Some(registered)) if jku != registered => {
            return Err(format!("`jku` {jku} is not the registered JWKS URL"));
        }
        (Some(_), None) => return Err("`jku` given but this client registered its keys inline".into()),
        _ => {}
    }
    let wanted_kty = match alg {
        "RS384" => "RSA",
        "ES384" => "EC",
        other => return Err(format!("alg `{other}` is not accepted (RS384 or ES384)")),
    };
    let keys = client
        .jwks
        .get("keys")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let candidates: Vec<&Value> = keys
        .iter()
        .filter(|k| {
            k.get("kid").and_then(Value::as_str) == Some(kid)
                && k.get("kty").and_then(Value::as_str) == Some(wanted_kty)
        })
        .collect();
    let jwk = match candidates.as_slice() {
        [one] => *one,
        [] => return Err(format!("no registered {wanted_kty} key has kid `{kid}`")),
        _ => return Err(format!("more than one registered key has kid `{kid}`")),
    };
    let signed_len = parts[0].len() + 1 + parts[1].len();
    verify_signature(alg, jwk, &jwt.as_bytes()[..signed_len], &signature)?;
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == token_url,
        Some(Value::Array(auds)) => auds.len() == 1 && auds[0].as_str() == Some(token_url),
        _ => false,
    };
    if !audience_ok {
        return Err(format!("`aud` must be exactly the token endpoint {token_url}"));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or("JWT `exp` must be an integer")?;
    if exp <= now {
        return Err("JWT has expired".into());
    }
    if exp > now + max_lifetime {
        return Err(format!("JWT `exp` is more than {max_lifetime} seconds in the future"));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
        .ok_or("JWT has no `jti`")?;
    Ok(VerifiedAssertion {
        client_id: iss.to_string(),
        jti: jti.to_string(),
        exp,
        alg: alg.to_string(),
    })
}
