//! Secrets that cannot leak through `Debug`, `Display` or tracing fields.

use std::fmt;

/// A secret string (access token, signed JWT, PEM). Its `Debug` and `Display` print a
/// placeholder; the value is reachable only through [`Secret::expose`], so every place that
/// sends it somewhere is greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for putting on the wire. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("eyJhbGciOiJSUzM4NCJ9.payload.sig");
        assert!(!format!("{secret:?}").contains("eyJ"));
        assert!(!format!("{secret}").contains("eyJ"));
        assert_eq!(secret.expose(), "eyJhbGciOiJSUzM4NCJ9.payload.sig");
    }
}
