//! Authorization of admin actions: a bearer token from `[server] admin_token_file` or
//! `[server] admin_token`.
//!
//! Tokens are compared as SHA-256 digests with a comparison that does not stop at the
//! first differing byte. Hashing first hides the token's length. Even a comparison that
//! leaked timing would only reveal how many leading digest bytes match, and that does not
//! help to guess the token, because finding an input with a chosen digest prefix is a
//! preimage search. So this needs no extra crate such as `subtle`.

use std::path::Path;
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::{ServerConfig, MIN_ADMIN_TOKEN_LEN};

/// Reason an admin action was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token is configured, so admin actions are off.
    Disabled,
    /// The request has no `Authorization: Bearer` header.
    MissingToken,
    /// The request's bearer token does not match.
    WrongToken,
}

/// The configured admin token, if any, and the log throttle for rejected requests.
pub struct AdminAuth {
    token_digest: Option<[u8; 32]>,
    rejections: Mutex<RejectionLog>,
}

struct RejectionLog {
    last_logged: Option<Instant>,
    suppressed: u64,
}

/// Rejected requests are logged at most once per this interval, with a count of the rest.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl AdminAuth {
    /// Reads the token: from `admin_token_file` when set, else `admin_token`. Fails when
    /// the file cannot be read or contains no usable token.
    pub fn from_config(server: &ServerConfig) -> std::io::Result<AdminAuth> {
        let token = match (&server.admin_token_file, &server.admin_token) {
            (Some(path), inline) => {
                if inline.is_some() {
                    info!(path = %path.display(), "admin_token_file is set, so admin_token is ignored");
                }
                Some(read_token_file(path)?)
            }
            (None, Some(token)) => Some(token.expose().to_owned()),
            (None, None) => None,
        };
        if token.is_none() {
            info!("no admin token configured; admin actions such as POST /admin/services/NAME/warm are rejected with 403");
        }
        Ok(AdminAuth::new(token.as_deref()))
    }

    /// Builds the check for `token`, or one that denies every action when `None`.
    pub fn new(token: Option<&str>) -> AdminAuth {
        AdminAuth {
            token_digest: token.map(|token| Sha256::digest(token.as_bytes()).into()),
            rejections: Mutex::new(RejectionLog { last_logged: None, suppressed: 0 }),
        }
    }

    /// Returns true when a token is configured, so admin actions can be allowed.
    pub fn is_enabled(&self) -> bool {
        self.token_digest.is_some()
    }

    /// Checks the request's `Authorization` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(expected) = &self.token_digest else {
            return Err(Denied::Disabled);
        };
        let Some(presented) = bearer_token(headers) else {
            return Err(Denied::MissingToken);
        };
        let presented: [u8; 32] = Sha256::digest(presented).into();
        if digests_equal(expected, &presented) {
            Ok(())
        } else {
            Err(Denied::WrongToken)
        }
    }

    /// Logs a rejected admin request, throttled so that a client retrying in a loop does
    /// not flood the log.
    pub fn log_rejection(&self, denied: Denied, path: &str) {
        let mut log = self.rejections.lock();
        let now = Instant::now();
        if log.last_logged.is_some_and(|last| now.duration_since(last) < REJECTION_LOG_INTERVAL) {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last_logged = Some(now);
        drop(log);
        warn!(reason = ?denied, path, suppressed_since_last_log = suppressed, "admin request rejected");
    }
}

/// Returns the token of an `Authorization: Bearer <token>` header. The scheme is matched
/// case-insensitively, as RFC 7235 requires.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares two digests in time independent of where they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(difference) == 0
}

fn read_token_file(path: &Path) -> std::io::Result<String> {
    let failed = |problem: String| {
        std::io::Error::other(format!("[server] admin_token_file {}: {problem}", path.display()))
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| failed(format!("failed to read the token: {error}; create the file or fix the path")))?;
    // Files written by `echo` or editors end in a newline, which is not part of the token.
    let token = text.trim();
    if token.chars().count() < MIN_ADMIN_TOKEN_LEN {
        return Err(failed(format!(
            "the token is shorter than {MIN_ADMIN_TOKEN_LEN} characters; write a longer one, such as the output of `openssl rand -hex 32`"
        )));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(failed("the token contains whitespace or a control character; write it on one line".to_owned()));
    }
    warn_if_world_readable(path);
    Ok(token.to_owned())
}

fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.permissions().mode() & 0o004 != 0 {
            warn!(path = %path.display(), "admin_token_file is readable by every user; restrict it, for example with chmod 600");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        headers
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn check_accepts_only_matching_bearer_token() {
        let auth = AdminAuth::new(Some(TOKEN));
        assert_eq!(auth.check(&headers(&format!("Bearer {TOKEN}"))), Ok(()));
        assert_eq!(auth.check(&headers(&format!("bearer {TOKEN}"))), Ok(()), "the scheme is case-insensitive");
        assert_eq!(auth.check(&HeaderMap::new()), Err(Denied::MissingToken));
        assert_eq!(auth.check(&headers(&format!("Basic {TOKEN}"))), Err(Denied::MissingToken));
        assert_eq!(auth.check(&headers("Bearer ")), Err(Denied::MissingToken));
        assert_eq!(auth.check(&headers(&format!("Bearer {TOKEN}x"))), Err(Denied::WrongToken));
        assert_eq!(auth.check(&headers(&format!("Bearer {}", &TOKEN[1..]))), Err(Denied::WrongToken));
        assert_eq!(auth.check(&headers("Bearer 1123456789abcdef0123456789abcdef")), Err(Denied::WrongToken));
    }

    #[test]
    fn check_without_token_denies_everything() {
        let auth = AdminAuth::new(None);
        assert_eq!(auth.check(&headers(&format!("Bearer {TOKEN}"))), Err(Denied::Disabled));
        assert_eq!(auth.check(&HeaderMap::new()), Err(Denied::Disabled));
    }

    #[test]
    fn digests_equal_compares_every_byte() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
        b[31] ^= 1;
        b[0] ^= 0x80;
        assert!(!digests_equal(&a, &b));
    }

    #[test]
    fn token_file_wins_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        let server = ServerConfig {
            admin_token: Some(crate::config::Secret::new("inline-token-not-used-0000".to_owned())),
            admin_token_file: Some(path.clone()),
            ..ServerConfig::default()
        };
        let auth = AdminAuth::from_config(&server).unwrap();
        assert_eq!(auth.check(&headers(&format!("Bearer {TOKEN}"))), Ok(()));
        assert_eq!(auth.check(&headers("Bearer inline-token-not-used-0000")), Err(Denied::WrongToken));
    }

    #[test]
    fn token_file_problems_fail_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let spaced = dir.path().join("spaced");
        std::fs::write(&spaced, "0123456789 abcdef0123456789\n").unwrap();
        for (path, expected) in [(&missing, "failed to read the token"), (&short, "shorter than 16"), (&spaced, "whitespace")] {
            let server = ServerConfig { admin_token_file: Some(path.clone()), ..ServerConfig::default() };
            let error = AdminAuth::from_config(&server).err().expect("start should fail");
            let message = error.to_string();
            assert!(message.contains(expected), "{}: {message}", path.display());
            assert!(message.contains(&path.display().to_string()), "the message names the file: {message}");
        }
    }
}
