//! Generated names, UIDs and timestamps in the formats the API server uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Characters that the API server uses for generated name suffixes: no vowels, so
/// suffixes never spell words, and no characters that look alike (0/o, 1/l, 3/e).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

static SEED: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns a pseudo-random u64 (splitmix64 over a seeded process-wide counter).
///
/// The values only need to differ between objects and between test processes;
/// nothing here needs cryptographic randomness.
pub(super) fn random_u64() -> u64 {
    let seed = *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 32)
    });
    let step = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Returns `len` random characters from the API server's name-suffix alphabet.
pub(super) fn random_suffix(len: usize) -> String {
    (0..len)
        .map(|_| NAME_ALPHABET[(random_u64() % NAME_ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// Returns a random UID in the 8-4-4-4-12 hex form of a version 4 UUID.
pub(super) fn new_uid() -> String {
    let high = random_u64();
    let low = random_u64();
    let bytes: Vec<u8> = high
        .to_be_bytes()
        .into_iter()
        .chain(low.to_be_bytes())
        .collect();
    let mut bytes: [u8; 16] = bytes.try_into().expect("two u64 values make 16 bytes");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Returns a stable 10-character hash in the name-suffix alphabet, used as the
/// pod-template-hash label of a deployment's pods.
pub(super) fn template_hash(input: &str) -> String {
    // FNV-1a, 64 bit.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in input.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..10)
        .map(|i| {
            let digit = (hash >> (i * 6)) % NAME_ALPHABET.len() as u64;
            NAME_ALPHABET[digit as usize] as char
        })
        .collect()
}

pub(super) fn now_timestamp() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("system clock is after 1970");
    Timestamp::new(
        since_epoch.as_secs() as i64,
        since_epoch.subsec_nanos() as i32,
    )
    .expect("current time is within jiff's range")
}

pub(super) fn now_time() -> Time {
    Time(now_timestamp())
}

/// Formats an age the way kubectl's AGE column does (for example "45s", "3m2s", "5h").
pub(super) fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    let seconds = seconds.max(0);
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if hours < 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        format!("{}y", days / 365)
    }
}

/// Returns the seconds elapsed since an RFC 3339 timestamp, or None if it does not parse.
pub(super) fn seconds_since(rfc3339: &str) -> Option<i64> {
    let then: Timestamp = rfc3339.parse().ok()?;
    Some(now_timestamp().as_second() - then.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_has_uuid_shape() {
        let uid = new_uid();
        let parts: Vec<&str> = uid.split('-').collect();
        let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lengths, vec![8, 4, 4, 4, 12]);
        assert_ne!(new_uid(), uid);
    }

    #[test]
    fn human_duration_matches_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
    }

    #[test]
    fn template_hash_is_stable() {
        assert_eq!(template_hash("models/echo"), template_hash("models/echo"));
        assert_ne!(template_hash("models/echo"), template_hash("models/other"));
        assert_eq!(template_hash("x").len(), 10);
    }
}
