//! JWT tokens: HS256 with the claims `sub` (user id), `tier` and `exp`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims muxgate reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id: streams, limits and resume are scoped to it.
    pub sub: String,
    /// The user's tier, one of the configured `[tiers]`.
    pub tier: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused. The text goes to the client in the `unauthorized` frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("unknown tier `{0}`")]
    UnknownTier(String),
}

/// Signs and verifies tokens with one shared secret.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Tiers a token may carry.
    tiers: Vec<String>,
}

impl Authenticator {
    pub fn new(secret: &[u8], leeway_secs: u64, tiers: Vec<String>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            tiers,
        }
    }

    /// A signed token for `user` in `tier`, valid for `ttl`.
    pub fn issue(&self, user: &str, tier: &str, ttl: Duration) -> Result<String, AuthError> {
        check_sub(user)?;
        if !self.tiers.iter().any(|t| t == tier) {
            return Err(AuthError::UnknownTier(tier.to_string()));
        }
        let claims = Claims {
            sub: user.to_string(),
            tier: tier.to_string(),
            exp: unix_now() + ttl.as_secs(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid(e.to_string()),
                }
            })?;
        let claims = data.claims;
        check_sub(&claims.sub)?;
        if !self.tiers.contains(&claims.tier) {
            return Err(AuthError::UnknownTier(claims.tier));
        }
        Ok(claims)
    }
}

/// Longest `sub` accepted, in bytes.
pub const MAX_SUB_LEN: usize = 256;

/// The user id is logged, keyed on and shown to operators: bounded, and nothing in it may
/// forge a log line (no newline, ESC or other control character).
fn check_sub(sub: &str) -> Result<(), AuthError> {
    if sub.is_empty() || sub.len() > MAX_SUB_LEN || !crate::protocol::printable(sub) {
        return Err(AuthError::Invalid(format!(
            "`sub` must be 1-{MAX_SUB_LEN} bytes of printable characters"
        )));
    }
    Ok(())
}

pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the Unix epoch: a token's `exp` plus a leeway in milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(b"0123456789abcdef", 0, vec!["free".into(), "pro".into()])
    }

    #[test]
    fn round_trip() {
        let a = auth();
        let t = a
            .issue("alice", "pro", Duration::from_secs(60))
            .expect("issue");
        let c = a.verify(&t).expect("verify");
        assert_eq!(c.sub, "alice");
        assert_eq!(c.tier, "pro");
    }

    #[test]
    fn refuses_bad_tokens() {
        let a = auth();
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
        let other = Authenticator::new(b"another-secret-of-16", 0, vec!["pro".into()]);
        let t = other
            .issue("alice", "pro", Duration::from_secs(60))
            .expect("issue");
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "a".into(),
                tier: "pro".into(),
                exp: unix_now() - 100,
            },
            &EncodingKey::from_secret(b"0123456789abcdef"),
        )
        .expect("encode");
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        assert_eq!(
            a.issue("a", "gold", Duration::from_secs(1)),
            Err(AuthError::UnknownTier("gold".into()))
        );
        for sub in ["", "a\nb", "a\u{1b}[2J", "x\u{202e}y"] {
            let forged = encode(
                &Header::new(Algorithm::HS256),
                &Claims {
                    sub: sub.into(),
                    tier: "pro".into(),
                    exp: unix_now() + 100,
                },
                &EncodingKey::from_secret(b"0123456789abcdef"),
            )
            .expect("encode");
            assert!(
                matches!(a.verify(&forged), Err(AuthError::Invalid(m)) if m.contains("printable")),
                "{sub:?}"
            );
            assert!(a.issue(sub, "pro", Duration::from_secs(1)).is_err());
        }
    }
}
