//! Duration strings such as "30s", "10ms" or "1h30m".

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// A duration string that [`parse_duration`] rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "invalid duration {input:?}: expected an integer followed by ms, s, m or h, such as \"30s\""
    )]
    Format { input: String },
    #[error(
        "invalid duration {input:?}: units must go from largest to smallest and appear once each, such as \"1m30s\""
    )]
    UnitOrder { input: String },
    #[error("invalid duration {input:?}: too large, the maximum is about 584 million years")]
    Overflow { input: String },
}

/// Parses a duration written as one or more `<integer><unit>` parts, such as "500ms",
/// "30s" or "1h30m".
///
/// Units are `h`, `m`, `s` and `ms`. With several parts, each unit appears at most once
/// and larger units come first. Spaces, signs, fractions and a bare number without a unit
/// are rejected. The result has millisecond resolution and must fit in `u64` milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let format_error = || DurationError::Format {
        input: text.to_owned(),
    };
    if text.is_empty() {
        return Err(format_error());
    }

    let mut total_ms: u128 = 0;
    // Rank of the previous unit, 0 for h up to 3 for ms, to enforce largest-first order.
    let mut previous_rank: Option<u8> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let digit_count = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digit_count == 0 {
            return Err(format_error());
        }
        // Only an overflow can fail here, because the slice contains only ASCII digits.
        let number: u128 = rest[..digit_count]
            .parse()
            .map_err(|_| DurationError::Overflow {
                input: text.to_owned(),
            })?;
        rest = &rest[digit_count..];

        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (ms_per_unit, rank) = match &rest[..unit_len] {
            "h" => (3_600_000, 0),
            "m" => (60_000, 1),
            "s" => (1_000, 2),
            "ms" => (1, 3),
            _ => return Err(format_error()),
        };
        rest = &rest[unit_len..];

        if previous_rank.is_some_and(|previous| rank <= previous) {
            return Err(DurationError::UnitOrder {
                input: text.to_owned(),
            });
        }
        previous_rank = Some(rank);

        total_ms = number
            .checked_mul(ms_per_unit)
            .and_then(|part| total_ms.checked_add(part))
            .ok_or_else(|| DurationError::Overflow {
                input: text.to_owned(),
            })?;
    }

    let total_ms = u64::try_from(total_ms).map_err(|_| DurationError::Overflow {
        input: text.to_owned(),
    })?;
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration in the syntax that [`parse_duration`] reads, such as "1m30s" or
/// "10ms". Parts below one millisecond are dropped.
pub fn format_duration(duration: Duration) -> String {
    let mut remaining_ms = duration.as_millis();
    if remaining_ms == 0 {
        return "0s".to_owned();
    }
    let mut text = String::new();
    for (unit, ms_per_unit) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        let count = remaining_ms / ms_per_unit;
        if count > 0 {
            text.push_str(&format!("{count}{unit}"));
            remaining_ms %= ms_per_unit;
        }
    }
    text
}

/// Deserializes a duration string with [`parse_duration`], for use as
/// `#[serde(deserialize_with = "crate::config::duration::deserialize")]`.
///
/// A value of another type, such as the integer `30`, fails with
/// "expected a duration string such as \"30s\"".
pub fn deserialize<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_str(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a duration string such as \"30s\"")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
        parse_duration(value).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_compound_values() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn rejects_malformed_values() {
        for input in [
            "",
            "5",
            "s",
            "5 s",
            " 5s",
            "5s ",
            "-5s",
            "+5s",
            "1.5s",
            "5S",
            "5sec",
            "5 minutes",
            "5d",
            "1m30",
            "5µs",
        ] {
            assert_eq!(
                parse_duration(input),
                Err(DurationError::Format {
                    input: input.to_owned()
                }),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn rejects_unit_order_and_repeats() {
        for input in ["30s1m", "1m1m", "500ms1s", "1s1s"] {
            assert_eq!(
                parse_duration(input),
                Err(DurationError::UnitOrder {
                    input: input.to_owned()
                }),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn rejects_overflow() {
        for input in [
            "18446744073709551616ms",
            "99999999999999999999999999999999999999999s",
            "5124095576030432h",
            "100000000000000000000000000000000000h",
        ] {
            assert_eq!(
                parse_duration(input),
                Err(DurationError::Overflow {
                    input: input.to_owned()
                }),
                "input {input:?}"
            );
        }
        assert_eq!(
            parse_duration("18446744073709551615ms"),
            Ok(Duration::from_millis(u64::MAX))
        );
    }

    #[test]
    fn format_duration_round_trips() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(3_723_004), "1h2m3s4ms"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms");
    }

    #[test]
    fn error_message_names_value_and_format() {
        let error = parse_duration("5 minutes").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid duration \"5 minutes\": expected an integer followed by ms, s, m or h, such as \"30s\""
        );
    }
}
