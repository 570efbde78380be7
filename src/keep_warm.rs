//! Keep-warm windows: weekly times during which a service is started ahead of traffic and
//! not scaled to zero.
//!
//! A window is written as `"[DAYS] HH:MM-HH:MM ZONE"`, for example
//! `"Mon-Fri 08:00-18:00 Europe/Berlin"`:
//!
//! - `DAYS` is a comma-separated list of days (`Mon` to `Sun`, or the full English names,
//!   in any case) and inclusive day ranges such as `Mon-Fri` or `Fri-Mon`. Without it the
//!   window applies to every day.
//! - `HH:MM-HH:MM` is a wall-clock start and end, from `00:00` to `23:59`; the end may also
//!   be `24:00`. An end at or before the start means the window ends on the next day, so
//!   `"Fri 22:00-02:00 UTC"` runs from Friday 22:00 to Saturday 02:00. The days name the
//!   day on which a window starts.
//! - `ZONE` is an IANA time zone name such as `Europe/Berlin`, or `UTC`.
//!
//! Times are local to `ZONE`, so a window follows daylight saving time. A time that does not
//! exist on a given day (skipped by a spring-forward transition) is moved forward by the
//! length of the gap, and a time that happens twice (repeated by a fall-back transition)
//! means its first occurrence. This is jiff's "compatible" disambiguation, the one RFC 5545
//! prescribes for calendars.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::registry::Registry;

const MINUTES_PER_DAY: u16 = 24 * 60;

/// How long the scheduler sleeps at most between two looks at the windows. It bounds how
/// late a reloaded schedule or a wall-clock jump takes effect, and how often a service that
/// stopped inside a window (a crash, a failed start) is started again.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Result of [`crate::service::Service::warm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmOutcome {
    /// The service was idle and an instance is starting now.
    Started,
    /// The service is scaling down; an instance starts once that has finished.
    AfterScaleDown,
    /// The service is already starting or serving; carries its state for `/status`.
    AlreadyRunning(&'static str),
    /// coldgate is shutting down or the service was removed, so nothing starts.
    Closed,
}

/// One keep-warm window, as parsed from its text.
#[derive(Debug, Clone)]
pub struct KeepWarmWindow {
    /// The text as written, trimmed, for `/status` and logs.
    text: String,
    /// Selected start days; bit 0 is Monday, bit 6 is Sunday.
    days: u8,
    /// Start, in minutes after local midnight: 0 to 1439.
    start: u16,
    /// End, in minutes after local midnight: 0 to 1440. At or before `start` means the next
    /// day.
    end: u16,
    zone: TimeZone,
    /// The zone name as written, used for equality because `TimeZone` has no `PartialEq`.
    zone_name: String,
}

impl PartialEq for KeepWarmWindow {
    fn eq(&self, other: &Self) -> bool {
        self.days == other.days && self.start == other.start && self.end == other.end && self.zone_name == other.zone_name
    }
}

impl Eq for KeepWarmWindow {}

impl fmt::Display for KeepWarmWindow {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

impl KeepWarmWindow {
    /// Parses one window. The error names the problem and the fix. It does not repeat the
    /// whole text, because the caller shows that next to it.
    pub fn parse(text: &str) -> Result<KeepWarmWindow, String> {
        let tokens: Vec<&str> = text.split_whitespace().collect();
        let usage = "expected \"[days] HH:MM-HH:MM zone\", such as \"Mon-Fri 08:00-18:00 Europe/Berlin\"";
        let (zone_token, times_token, day_tokens) = match tokens.as_slice() {
            [] => return Err(format!("empty window; {usage}")),
            [only] if looks_like_times(only) => {
                return Err(format!("missing time zone; add an IANA name such as \"Europe/Berlin\" or \"UTC\" after {only:?}"))
            }
            [_] => return Err(format!("missing times; {usage}")),
            [rest @ .., times, zone] => (*zone, *times, rest),
        };
        if looks_like_times(zone_token) {
            return Err(format!(
                "missing time zone; add an IANA name such as \"Europe/Berlin\" or \"UTC\" after {zone_token:?}"
            ));
        }
        if !looks_like_times(times_token) {
            return Err(format!("expected times such as \"08:00-18:00\" before the zone, found {times_token:?}; {usage}"));
        }

        // Joining the day tokens lets "Sat, Sun" be written with a space after the comma.
        let days = if day_tokens.is_empty() { 0b111_1111 } else { parse_days(&day_tokens.concat())? };
        let (start, end) = parse_times(times_token)?;
        let zone = TimeZone::get(zone_token).map_err(|_| {
            format!("unknown time zone {zone_token:?}; use an IANA name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\"")
        })?;

        Ok(KeepWarmWindow {
            text: tokens.join(" "),
            days,
            start,
            end,
            zone,
            zone_name: zone_token.to_owned(),
        })
    }

    /// Returns the window's text as written, with runs of whitespace collapsed.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn starts_on(&self, weekday: Weekday) -> bool {
        self.days & (1 << weekday.to_monday_zero_offset()) != 0
    }

    /// Returns the start and end of the window that starts on local date `date`, or `None`
    /// when the window does not start on that weekday. The end can come before the start
    /// on a day where a DST gap moves the start forward; such an occurrence contains no
    /// instant.
    fn occurrence(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        if !self.starts_on(date.weekday()) {
            return None;
        }
        let start = self.local_instant(date, self.start)?;
        let end_date = if self.end <= self.start { date.tomorrow().ok()? } else { date };
        let end = self.local_instant(end_date, self.end)?;
        Some((start, end))
    }

    /// Converts a local date and minute of the day (1440 being the next midnight) to an
    /// instant in the window's zone.
    fn local_instant(&self, date: Date, minute: u16) -> Option<Timestamp> {
        let (date, minute) = if minute == MINUTES_PER_DAY { (date.tomorrow().ok()?, 0) } else { (date, minute) };
        let local = DateTime::from_parts(date, jiff::civil::time((minute / 60) as i8, (minute % 60) as i8, 0, 0));
        self.zone.to_ambiguous_timestamp(local).compatible().ok()
    }

    fn local_date(&self, now: Timestamp) -> Date {
        self.zone.to_datetime(now).date()
    }

    /// Returns the end of the occurrence that contains `now`, or `None` outside the window.
    pub fn end_if_open(&self, now: Timestamp) -> Option<Timestamp> {
        let today = self.local_date(now);
        // A window lasts at most a day, so only one that started yesterday or today can
        // contain `now`.
        let yesterday = today.yesterday().ok();
        [yesterday, Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|date| self.occurrence(date))
            .find(|(start, end)| *start <= now && now < *end)
            .map(|(_, end)| end)
    }

    /// Returns true when `now` lies inside an occurrence of the window: at or after its
    /// start and before its end.
    pub fn contains(&self, now: Timestamp) -> bool {
        self.end_if_open(now).is_some()
    }

    /// Returns the first start of the window strictly after `after`.
    pub fn next_start(&self, after: Timestamp) -> Option<Timestamp> {
        let mut date = self.local_date(after).yesterday().ok()?;
        // Every weekday comes up within eight days from yesterday; the ninth covers a start
        // that a DST gap pushed past `after` on the same weekday.
        for _ in 0..9 {
            if let Some((start, _)) = self.occurrence(date) {
                if start > after {
                    return Some(start);
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

fn looks_like_times(token: &str) -> bool {
    token.contains(':') && token.contains('-') && token.starts_with(|c: char| c.is_ascii_digit())
}

/// Parses a comma-separated list of days and day ranges into a bit set, Monday first.
fn parse_days(text: &str) -> Result<u8, String> {
    let mut days = 0u8;
    for part in text.split(',') {
        if part.is_empty() {
            return Err(format!("empty day in {text:?}; separate days with single commas, such as \"Mon,Wed,Fri\""));
        }
        match part.split_once('-') {
            Some((first, last)) => {
                let first = parse_day(first)?;
                let last = parse_day(last)?;
                let (first, last) = (first.to_monday_zero_offset(), last.to_monday_zero_offset());
                // A range such as Fri-Mon wraps around the end of the week.
                let length = (last - first).rem_euclid(7);
                for step in 0..=length {
                    days |= 1 << ((first + step) % 7);
                }
            }
            None => days |= 1 << parse_day(part)?.to_monday_zero_offset(),
        }
    }
    Ok(days)
}

fn parse_day(text: &str) -> Result<Weekday, String> {
    const NAMES: [(&str, &str, Weekday); 7] = [
        ("mon", "monday", Weekday::Monday),
        ("tue", "tuesday", Weekday::Tuesday),
        ("wed", "wednesday", Weekday::Wednesday),
        ("thu", "thursday", Weekday::Thursday),
        ("fri", "friday", Weekday::Friday),
        ("sat", "saturday", Weekday::Saturday),
        ("sun", "sunday", Weekday::Sunday),
    ];
    let lower = text.to_ascii_lowercase();
    NAMES
        .iter()
        .find(|(short, long, _)| lower == *short || lower == *long)
        .map(|(_, _, day)| *day)
        .ok_or_else(|| {
            format!("unknown day {text:?}; use Mon, Tue, Wed, Thu, Fri, Sat or Sun, or a range such as \"Mon-Fri\"")
        })
}

/// Parses "HH:MM-HH:MM" into start and end minutes after midnight.
fn parse_times(text: &str) -> Result<(u16, u16), String> {
    let Some((start, end)) = text.split_once('-') else {
        return Err(format!("invalid times {text:?}; write a start and an end such as \"08:00-18:00\""));
    };
    let start = parse_time(start)?;
    let end = parse_time(end)?;
    if start == MINUTES_PER_DAY {
        return Err("a window cannot start at 24:00; start it at 00:00 of the next day".to_owned());
    }
    if start == end {
        return Err(format!("start and end are equal in {text:?}; for a whole day write \"00:00-24:00\""));
    }
    Ok((start, end))
}

/// Parses "H:MM" or "HH:MM" (24-hour clock, 24:00 allowed) into minutes after midnight.
fn parse_time(text: &str) -> Result<u16, String> {
    let invalid = || format!("invalid time {text:?}; use the 24-hour clock HH:MM, such as \"08:00\" or \"24:00\"");
    let (hours, minutes) = text.split_once(':').ok_or_else(invalid)?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(hours) || hours.len() > 2 || !all_digits(minutes) || minutes.len() != 2 {
        return Err(invalid());
    }
    let hours: u16 = hours.parse().map_err(|_| invalid())?;
    let minutes: u16 = minutes.parse().map_err(|_| invalid())?;
    if minutes > 59 || hours > 24 || (hours == 24 && minutes != 0) {
        return Err(invalid());
    }
    Ok(hours * 60 + minutes)
}

/// The keep-warm windows of one service. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepWarmSchedule {
    windows: Arc<[KeepWarmWindow]>,
}

impl KeepWarmSchedule {
    pub fn new(windows: Vec<KeepWarmWindow>) -> Self {
        KeepWarmSchedule { windows: windows.into() }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub fn windows(&self) -> &[KeepWarmWindow] {
        &self.windows
    }

    /// Returns true when `now` lies inside any of the windows, so the service must not be
    /// scaled to zero.
    pub fn in_keep_warm_window(&self, now: Timestamp) -> bool {
        self.windows.iter().any(|window| window.contains(now))
    }

    /// Returns the earliest window start strictly after `after`.
    pub fn next_start(&self, after: Timestamp) -> Option<Timestamp> {
        self.windows.iter().filter_map(|window| window.next_start(after)).min()
    }

    /// Returns the latest end among the windows open at `now`, or `None` when none is open.
    /// Windows that overlap or touch later ones are not chained, so the service may stay
    /// warm past this instant.
    pub fn open_until(&self, now: Timestamp) -> Option<Timestamp> {
        self.windows.iter().filter_map(|window| window.end_if_open(now)).max()
    }
}

/// Warms every service whose keep-warm window is open, at each window's start and then
/// every [`RECHECK_INTERVAL`] while the window lasts, until `stop` turns true.
///
/// One task serves all services and reads the current registry on each pass, so services
/// and windows added or changed by a configuration reload are picked up without a task per
/// service to start or stop.
pub async fn run(registry: Arc<ArcSwap<Registry>>, mut stop: watch::Receiver<bool>) {
    loop {
        let now = Timestamp::now();
        let mut wake_at = now + jiff::SignedDuration::try_from(RECHECK_INTERVAL).expect("30 s fits a SignedDuration");
        for service in registry.load().services() {
            let schedule = service.keep_warm_schedule();
            if schedule.is_empty() {
                continue;
            }
            if schedule.in_keep_warm_window(now) {
                match service.warm() {
                    WarmOutcome::Started | WarmOutcome::AfterScaleDown => {
                        info!(service = %service.name, "keep_warm window is open; starting the service");
                    }
                    WarmOutcome::AlreadyRunning(_) | WarmOutcome::Closed => {}
                }
            }
            if let Some(start) = schedule.next_start(now) {
                wake_at = wake_at.min(start);
            }
        }

        let sleep = now.duration_until(wake_at).unsigned_abs();
        debug!(sleep_ms = sleep.as_millis() as u64, "keep_warm scheduler sleeping");
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(text: &str) -> KeepWarmWindow {
        KeepWarmWindow::parse(text).unwrap_or_else(|error| panic!("{text:?} should parse: {error}"))
    }

    /// Parses a time written with an explicit offset, such as "2025-03-28T21:59:00Z".
    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|error| panic!("bad timestamp {text:?}: {error}"))
    }

    fn parse_error(text: &str) -> String {
        match KeepWarmWindow::parse(text) {
            Ok(_) => panic!("{text:?} should not parse"),
            Err(error) => error,
        }
    }

    #[test]
    fn parse_accepts_documented_forms() {
        let weekdays = window("Mon-Fri 08:00-18:00 Europe/Berlin");
        assert_eq!(weekdays.days, 0b001_1111);
        assert_eq!((weekdays.start, weekdays.end), (8 * 60, 18 * 60));
        assert_eq!(weekdays.as_str(), "Mon-Fri 08:00-18:00 Europe/Berlin");

        assert_eq!(window("08:00-09:00 UTC").days, 0b111_1111, "no days means every day");
        assert_eq!(window("Sat, Sun 10:00-12:00 UTC").days, 0b110_0000);
        assert_eq!(window("mon,WED,friday 7:30-9:00 UTC").days, 0b001_0101);
        assert_eq!(window("Fri-Mon 00:00-24:00 UTC").days, 0b111_0001, "ranges wrap around Sunday");
        assert_eq!(window("Sun-Sun 22:00-02:00 UTC").days, 0b100_0000);
        assert_eq!(window("Fri 22:00-02:00 UTC").end, 2 * 60);
        assert_eq!(window("  Tue   06:00-07:00   America/New_York ").as_str(), "Tue 06:00-07:00 America/New_York");
    }

    #[test]
    fn parse_rejects_malformed_windows() {
        for (text, expected) in [
            ("", "empty window"),
            ("Mon-Fri", "missing times"),
            ("Mon-Fri 08:00-18:00", "missing time zone"),
            ("08:00-18:00", "missing time zone"),
            ("Mon-Fri 08:00-18:00 Europe/Berln", "unknown time zone \"Europe/Berln\""),
            ("Mon-Fry 08:00-18:00 UTC", "unknown day \"Fry\""),
            ("Mon,,Fri 08:00-18:00 UTC", "empty day"),
            ("Mon 8-18 UTC", "expected times"),
            ("Mon 08:00 UTC", "expected times"),
            ("Mon 25:00-26:00 UTC", "invalid time \"25:00\""),
            ("Mon 08:60-09:00 UTC", "invalid time \"08:60\""),
            ("Mon 08:0-09:00 UTC", "invalid time \"08:0\""),
            ("Mon 24:00-02:00 UTC", "cannot start at 24:00"),
            ("Mon 24:30-02:00 UTC", "invalid time \"24:30\""),
            ("Mon 08:00-08:00 UTC", "start and end are equal"),
        ] {
            let error = parse_error(text);
            assert!(error.contains(expected), "{text:?}: expected {expected:?} in {error:?}");
        }
    }

    #[test]
    fn weekday_window_in_utc() {
        let weekdays = window("Mon-Fri 08:00-18:00 UTC");
        // 2025-06-02 is a Monday.
        assert!(!weekdays.contains(at("2025-06-02T07:59:59Z")));
        assert!(weekdays.contains(at("2025-06-02T08:00:00Z")), "the start is inside");
        assert!(weekdays.contains(at("2025-06-02T17:59:59Z")));
        assert!(!weekdays.contains(at("2025-06-02T18:00:00Z")), "the end is outside");
        assert!(weekdays.contains(at("2025-06-06T12:00:00Z")), "Friday");
        assert!(!weekdays.contains(at("2025-06-07T12:00:00Z")), "Saturday");
        assert!(!weekdays.contains(at("2025-06-08T12:00:00Z")), "Sunday");
    }

    #[test]
    fn window_in_zone_follows_local_time() {
        let berlin = window("Mon-Fri 08:00-18:00 Europe/Berlin");
        // Summer time: 08:00 in Berlin is 06:00 UTC.
        assert!(!berlin.contains(at("2025-06-02T05:59:00Z")));
        assert!(berlin.contains(at("2025-06-02T06:00:00Z")));
        assert!(!berlin.contains(at("2025-06-02T16:00:00Z")));
        // Winter time: 08:00 in Berlin is 07:00 UTC.
        assert!(!berlin.contains(at("2025-12-01T06:59:00Z")));
        assert!(berlin.contains(at("2025-12-01T07:00:00Z")));
        // Monday 07:30 in Tokyo is Sunday 22:30 UTC; the local weekday decides.
        let tokyo = window("Mon 07:00-09:00 Asia/Tokyo");
        assert!(tokyo.contains(at("2025-06-01T22:30:00Z")));
        assert!(!tokyo.contains(at("2025-06-02T22:30:00Z")));
    }

    #[test]
    fn window_across_midnight() {
        let night = window("Fri 22:00-02:00 UTC");
        // 2025-06-06 is a Friday.
        assert!(!night.contains(at("2025-06-06T21:59:59Z")));
        assert!(night.contains(at("2025-06-06T22:00:00Z")));
        assert!(night.contains(at("2025-06-06T23:59:59Z")));
        assert!(night.contains(at("2025-06-07T00:00:00Z")), "Saturday after midnight belongs to Friday's window");
        assert!(night.contains(at("2025-06-07T01:59:59Z")));
        assert!(!night.contains(at("2025-06-07T02:00:00Z")));
        assert!(!night.contains(at("2025-06-07T22:30:00Z")), "Saturday night is not selected");
        assert!(!night.contains(at("2025-06-06T01:00:00Z")), "Thursday's night is not selected");
        assert_eq!(night.end_if_open(at("2025-06-07T01:00:00Z")), Some(at("2025-06-07T02:00:00Z")));

        let whole_day = window("Sun 00:00-24:00 UTC");
        assert!(whole_day.contains(at("2025-06-08T00:00:00Z")));
        assert!(whole_day.contains(at("2025-06-08T23:59:59Z")));
        assert!(!whole_day.contains(at("2025-06-09T00:00:00Z")));
        assert!(!whole_day.contains(at("2025-06-07T23:59:59Z")));
    }

    #[test]
    fn window_through_spring_forward() {
        // Europe/Berlin skips 02:00-03:00 local on Sunday 2025-03-30 (01:00 UTC).
        let night = window("Sat 22:00-04:00 Europe/Berlin");
        // Starts at 22:00 CET (21:00 UTC) and ends at 04:00 CEST (02:00 UTC): 5 hours.
        assert!(!night.contains(at("2025-03-29T20:59:59Z")));
        assert!(night.contains(at("2025-03-29T21:00:00Z")));
        assert!(night.contains(at("2025-03-30T01:59:59Z")));
        assert!(!night.contains(at("2025-03-30T02:00:00Z")));

        // A start inside the gap moves forward by the gap: 02:30 becomes 03:30 CEST
        // (01:30 UTC), which is past the 03:00 end, so this occurrence is empty.
        let in_gap = window("Sun 02:30-03:00 Europe/Berlin");
        for minute in 0..180 {
            let instant = at("2025-03-30T00:00:00Z") + jiff::SignedDuration::from_mins(minute);
            assert!(!in_gap.contains(instant), "{instant} should be outside the skipped window");
        }
        // A week later the same window is an ordinary half hour.
        assert!(in_gap.contains(at("2025-04-06T00:45:00Z")));

        // A start in the gap that ends after it: 02:30 becomes 03:30 CEST (01:30 UTC).
        let across_gap = window("Sun 02:30-05:00 Europe/Berlin");
        assert!(!across_gap.contains(at("2025-03-30T01:29:59Z")));
        assert!(across_gap.contains(at("2025-03-30T01:30:00Z")));
        assert_eq!(across_gap.next_start(at("2025-03-29T12:00:00Z")), Some(at("2025-03-30T01:30:00Z")));
    }

    #[test]
    fn window_through_fall_back() {
        // Europe/Berlin repeats 02:00-03:00 local on Sunday 2025-10-26 (01:00 UTC).
        let night = window("Sat 22:00-04:00 Europe/Berlin");
        // Starts at 22:00 CEST (20:00 UTC) and ends at 04:00 CET (03:00 UTC): 7 hours.
        assert!(!night.contains(at("2025-10-25T19:59:59Z")));
        assert!(night.contains(at("2025-10-25T20:00:00Z")));
        assert!(night.contains(at("2025-10-26T02:59:59Z")));
        assert!(!night.contains(at("2025-10-26T03:00:00Z")));

        // 02:30 happens twice; the window starts at the first, 02:30 CEST (00:30 UTC), and
        // ends at 03:30 CET (02:30 UTC).
        let repeated = window("Sun 02:30-03:30 Europe/Berlin");
        assert!(!repeated.contains(at("2025-10-26T00:29:59Z")));
        assert!(repeated.contains(at("2025-10-26T00:30:00Z")));
        assert!(repeated.contains(at("2025-10-26T02:29:59Z")));
        assert!(!repeated.contains(at("2025-10-26T02:30:00Z")));
    }

    #[test]
    fn next_start_finds_following_occurrence() {
        let weekdays = window("Mon-Fri 08:00-18:00 Europe/Berlin");
        // Friday evening: the next start is Monday 08:00 CEST.
        assert_eq!(weekdays.next_start(at("2025-06-06T17:00:00Z")), Some(at("2025-06-09T06:00:00Z")));
        // Exactly at a start, the next one is the following day's.
        assert_eq!(weekdays.next_start(at("2025-06-02T06:00:00Z")), Some(at("2025-06-03T06:00:00Z")));
        // Across the spring-forward weekend, Monday 08:00 is in summer time.
        assert_eq!(weekdays.next_start(at("2025-03-28T17:00:00Z")), Some(at("2025-03-31T06:00:00Z")));

        let night = window("Fri 22:00-02:00 UTC");
        assert_eq!(night.next_start(at("2025-06-07T01:00:00Z")), Some(at("2025-06-13T22:00:00Z")));
    }

    #[test]
    fn schedule_combines_windows() {
        let schedule = KeepWarmSchedule::new(vec![window("Mon-Fri 08:00-12:00 UTC"), window("Mon-Fri 11:00-18:00 UTC")]);
        assert!(schedule.in_keep_warm_window(at("2025-06-02T09:00:00Z")));
        assert!(schedule.in_keep_warm_window(at("2025-06-02T17:00:00Z")));
        assert!(!schedule.in_keep_warm_window(at("2025-06-02T18:00:00Z")));
        assert_eq!(schedule.open_until(at("2025-06-02T11:30:00Z")), Some(at("2025-06-02T18:00:00Z")));
        assert_eq!(schedule.open_until(at("2025-06-02T19:00:00Z")), None);
        assert_eq!(schedule.next_start(at("2025-06-02T09:00:00Z")), Some(at("2025-06-02T11:00:00Z")));

        let empty = KeepWarmSchedule::default();
        assert!(!empty.in_keep_warm_window(at("2025-06-02T09:00:00Z")));
        assert_eq!(empty.next_start(at("2025-06-02T09:00:00Z")), None);
    }

    #[test]
    fn bundled_tz_database_has_zones() {
        // The tzdb-bundle-always feature embeds the database that jiff falls back to when
        // the system has no /usr/share/zoneinfo (a scratch or distroless container).
        let bundled = jiff::tz::TimeZoneDatabase::bundled();
        for name in ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC"] {
            assert!(bundled.get(name).is_ok(), "{name} missing from the bundled time zone database");
        }
    }

    #[test]
    fn windows_compare_by_meaning() {
        assert_eq!(window("Mon-Fri 08:00-18:00 UTC"), window("mon-fri  08:00-18:00 UTC"));
        assert_ne!(window("Mon-Fri 08:00-18:00 UTC"), window("Mon-Fri 08:00-18:00 Europe/Berlin"));
    }
}
