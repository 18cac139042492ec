//! Client signing keys: loading PEM private keys (PKCS#8, PKCS#1, SEC1), generating new ones,
//! and the JWK Set a client registers (or hosts) with an EHR.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::EncodingKey;
use p384::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The two algorithms SMART Backend Services requires a client to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    RS384,
    ES384,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::RS384 => "RS384",
            SigningAlgorithm::ES384 => "ES384",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "RS384" => Some(SigningAlgorithm::RS384),
            "ES384" => Some(SigningAlgorithm::ES384),
            _ => None,
        }
    }

    pub(crate) fn jwt_algorithm(self) -> jsonwebtoken::Algorithm {
        match self {
            SigningAlgorithm::RS384 => jsonwebtoken::Algorithm::RS384,
            SigningAlgorithm::ES384 => jsonwebtoken::Algorithm::ES384,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

enum KeyMaterial {
    Rsa(Box<rsa::RsaPrivateKey>),
    Ec(p384::SecretKey),
}

/// A private key ready to sign client assertions. `Debug` never shows key material.
#[derive(Clone)]
pub struct SigningKey {
    algorithm: SigningAlgorithm,
    kid: String,
    encoding: EncodingKey,
    public_jwk: Value,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

const MIN_RSA_BITS: usize = 2048;

fn key_error(reason: impl Into<String>) -> Error {
    Error::Key { reason: reason.into() }
}

fn parse_pem(pem: &str) -> Result<KeyMaterial> {
    let label = pem
        .lines()
        .find_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .and_then(|rest| rest.strip_suffix("-----"))
        .ok_or_else(|| key_error("not a PEM file (no -----BEGIN line)"))?;
    match label {
        "PRIVATE KEY" => {
            if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
                return Ok(KeyMaterial::Rsa(Box::new(key)));
            }
            if let Ok(key) = p384::SecretKey::from_pkcs8_pem(pem) {
                return Ok(KeyMaterial::Ec(key));
            }
            Err(key_error(
                "PKCS#8 key is neither RSA nor EC P-384 (ES384 needs the P-384 curve)",
            ))
        }
        "RSA PRIVATE KEY" => rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .map(|key| KeyMaterial::Rsa(Box::new(key)))
            .map_err(|e| key_error(format!("cannot read PKCS#1 RSA key: {e}"))),
        "EC PRIVATE KEY" => p384::SecretKey::from_sec1_pem(pem).map(KeyMaterial::Ec).map_err(|e| {
            key_error(format!(
                "cannot read SEC1 EC key as P-384 (ES384 needs the P-384 curve): {e}"
            ))
        }),
        "ENCRYPTED PRIVATE KEY" => Err(key_error(
            "the key is encrypted; decrypt it first (openssl pkcs8 -in key.pem -out plain.pem)",
        )),
        "PUBLIC KEY" | "CERTIFICATE" => Err(key_error(format!("this is a {label}, not a private key"))),
        other => Err(key_error(format!("unsupported PEM block `{other}`"))),
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexical order, base64url.
fn thumbprint(required_members: &Value) -> String {
    // serde_json's Map is ordered by key (BTreeMap) so this serialization is canonical.
    let canonical = serde_json::to_vec(required_members).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical))
}

impl KeyMaterial {
    fn algorithm(&self) -> SigningAlgorithm {
        match self {
            KeyMaterial::Rsa(_) => SigningAlgorithm::RS384,
            KeyMaterial::Ec(_) => SigningAlgorithm::ES384,
        }
    }

    /// The required public members (RFC 7638) of the key's JWK.
    fn public_members(&self) -> Value {
        match self {
            KeyMaterial::Rsa(key) => json!({
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            }),
            KeyMaterial::Ec(key) => {
                let point = key.public_key().to_encoded_point(false);
                let x = point.x().map(|x| URL_SAFE_NO_PAD.encode(x)).unwrap_or_default();
                let y = point.y().map(|y| URL_SAFE_NO_PAD.encode(y)).unwrap_or_default();
                json!({"crv": "P-384", "kty": "EC", "x": x, "y": y})
            }
        }
    }

    fn pkcs8_pem(&self) -> Result<String> {
        let pem = match self {
            KeyMaterial::Rsa(key) => key.to_pkcs8_pem(LineEnding::LF),
            KeyMaterial::Ec(key) => key.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map(|p| p.to_string())
            .map_err(|e| key_error(format!("cannot encode key as PKCS#8: {e}")))
    }
}

impl SigningKey {
    /// Loads a PEM private key. `algorithm`, when given, must fit the key; otherwise it is
    /// taken from the key (RSA → RS384, P-384 → ES384). `kid` defaults to the RFC 7638
    /// thumbprint, which is what `fhirhaul keys generate` puts in the JWKS.
    pub fn from_pem(pem: &str, algorithm: Option<SigningAlgorithm>, kid: Option<String>) -> Result<Self> {
        let material = parse_pem(pem)?;
        let key_algorithm = material.algorithm();
        if let Some(wanted) = algorithm
            && wanted != key_algorithm
        {
            return Err(key_error(format!(
                "algorithm {wanted} was configured but the key is for {key_algorithm}"
            )));
        }
        if let KeyMaterial::Rsa(key) = &material
            && key.size() * 8 < MIN_RSA_BITS
        {
            return Err(key_error(format!(
                "RSA key has {} bits; at least {MIN_RSA_BITS} are required",
                key.size() * 8
            )));
        }
        Self::from_material(&material, kid)
    }

    fn from_material(material: &KeyMaterial, kid: Option<String>) -> Result<Self> {
        let algorithm = material.algorithm();
        let members = material.public_members();
        let kid = match kid {
            Some(kid) if kid.trim().is_empty() => return Err(key_error("kid must not be empty")),
            Some(kid) => kid,
            None => thumbprint(&members),
        };
        let pkcs8 = material.pkcs8_pem()?;
        let encoding = match algorithm {
            SigningAlgorithm::RS384 => EncodingKey::from_rsa_pem(pkcs8.as_bytes()),
            SigningAlgorithm::ES384 => EncodingKey::from_ec_pem(pkcs8.as_bytes()),
        }
        .map_err(|e| key_error(format!("cannot use key for {algorithm}: {e}")))?;
        let mut public_jwk = members;
        if let Value::Object(map) = &mut public_jwk {
            map.insert("kid".into(), Value::String(kid.clone()));
            map.insert("alg".into(), Value::String(algorithm.as_str().into()));
            map.insert("use".into(), Value::String("sig".into()));
            map.insert("key_ops".into(), json!(["verify"]));
        }
        Ok(SigningKey {
            algorithm,
            kid,
            encoding,
            public_jwk,
        })
    }

    /// Generates a new key: RSA-2048 for RS384, P-384 for ES384. Returns the key and its
    /// PKCS#8 PEM for saving.
    pub fn generate(algorithm: SigningAlgorithm, kid: Option<String>) -> Result<(Self, String)> {
        let mut rng = rand::rngs::OsRng;
        let material = match algorithm {
            SigningAlgorithm::RS384 => KeyMaterial::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut rng, MIN_RSA_BITS)
                    .map_err(|e| key_error(format!("RSA key generation failed: {e}")))?,
            )),
            SigningAlgorithm::ES384 => KeyMaterial::Ec(p384::SecretKey::random(&mut rng)),
        };
        let key = Self::from_material(&material, kid)?;
        Ok((key, material.pkcs8_pem()?))
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public JWK (`kty`, `kid`, `alg`, `use=sig`, and `n`/`e` or `crv`/`x`/`y`).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }
}

/// A JWK Set as registered with an EHR. Holds several keys during a rotation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Jwks {
    pub keys: Vec<Value>,
}

impl Jwks {
    /// Adds a key, refusing a `kid` already present (servers select keys by `kid`, so a
    /// duplicate would make verification ambiguous).
    pub fn add(&mut self, jwk: Value) -> Result<()> {
        let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or_default();
        if self
            .keys
            .iter()
            .any(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
        {
            return Err(key_error(format!("the JWKS already has a key with kid `{kid}`")));
        }
        self.keys.push(jwk);
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| key_error(format!("not a JWK Set: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ec_key_round_trips_through_pem_with_the_same_kid() {
        let (key, pem) = SigningKey::generate(SigningAlgorithm::ES384, None).unwrap();
        let loaded = SigningKey::from_pem(&pem, None, None).unwrap();
        assert_eq!(loaded.algorithm(), SigningAlgorithm::ES384);
        assert_eq!(loaded.kid(), key.kid());
        let jwk = loaded.public_jwk();
        for member in ["kty", "kid", "crv", "x", "y", "alg", "use"] {
            assert!(jwk.get(member).is_some(), "missing {member}");
        }
        assert_eq!(jwk["crv"], "P-384");
    }

    #[test]
    fn sec1_ec_key_is_accepted() {
        let secret = p384::SecretKey::random(&mut rand::rngs::OsRng);
        let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
        let key = SigningKey::from_pem(&sec1, Some(SigningAlgorithm::ES384), Some("k1".into())).unwrap();
        assert_eq!(key.kid(), "k1");
    }

    #[test]
    fn pkcs1_rsa_key_is_accepted_and_small_rsa_keys_are_not() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let (_, pkcs8) = SigningKey::generate(SigningAlgorithm::RS384, None).unwrap();
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pkcs8).unwrap();
        let pkcs1 = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let loaded = SigningKey::from_pem(&pkcs1, None, None).unwrap();
        assert_eq!(loaded.algorithm(), SigningAlgorithm::RS384);
        assert_eq!(loaded.public_jwk()["kty"], "RSA");
        let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let error = SigningKey::from_pem(&small.to_pkcs1_pem(LineEnding::LF).unwrap(), None, None).unwrap_err();
        assert!(error.to_string().contains("1024 bits"), "{error}");
    }

    #[test]
    fn algorithm_mismatch_and_garbage_are_named() {
        let (_, pem) = SigningKey::generate(SigningAlgorithm::ES384, None).unwrap();
        let error = SigningKey::from_pem(&pem, Some(SigningAlgorithm::RS384), None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("RS384 was configured but the key is for ES384")
        );
        let error = SigningKey::from_pem("hello", None, None).unwrap_err();
        assert!(error.to_string().contains("not a PEM file"));
        let error = SigningKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            None,
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains("not a private key"));
    }

    #[test]
    fn jwks_refuses_duplicate_kid_and_keeps_rotation_keys() {
        let (a, _) = SigningKey::generate(SigningAlgorithm::ES384, Some("a".into())).unwrap();
        let (b, _) = SigningKey::generate(SigningAlgorithm::ES384, Some("b".into())).unwrap();
        let mut jwks = Jwks::default();
        jwks.add(a.public_jwk().clone()).unwrap();
        jwks.add(b.public_jwk().clone()).unwrap();
        assert!(jwks.add(a.public_jwk().clone()).is_err());
        let text = serde_json::to_string(&jwks).unwrap();
        assert_eq!(Jwks::parse(&text).unwrap().keys.len(), 2);
    }
}
