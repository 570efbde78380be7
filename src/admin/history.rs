//! The recent cold starts of each service, for `/status` and the status page's chart.
//!
//! The history lives in this table, keyed by the service's name allocation, instead of in
//! `Service` itself, so that recording it needs one added call in `Service::endpoint_ready`
//! and no change to the service's state. A service keeps its name allocation for its whole
//! life (reloads included), and an entry is dropped once that allocation is freed.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Cold starts kept per service; older ones are dropped.
pub const RECENT_COLD_STARTS: usize = 20;

/// One finished cold start: when the instance became ready and how long the start took.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ColdStart {
    /// Wall-clock time at which the instance passed its readiness probe, in milliseconds
    /// since the Unix epoch.
    pub at_unix_ms: u64,
    /// Time from the start of the activation to the passed readiness probe.
    pub seconds: f64,
}

struct Entry {
    service: Weak<str>,
    recent: VecDeque<ColdStart>,
}

impl Entry {
    /// True while `service` is the very allocation this entry was made for.
    fn belongs_to(&self, service: &Arc<str>) -> bool {
        self.service.upgrade().is_some_and(|name| Arc::ptr_eq(&name, service))
    }
}

static HISTORY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Adds a cold start of `service` that ended now.
pub fn record(service: &Arc<str>, elapsed: Duration) {
    let at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    let cold_start = ColdStart { at_unix_ms, seconds: elapsed.as_secs_f64() };

    let mut history = HISTORY.lock();
    // Services removed by a reload leave entries whose name is gone.
    history.retain(|entry| entry.service.strong_count() > 0);
    let index = match history.iter().position(|entry| entry.belongs_to(service)) {
        Some(index) => index,
        None => {
            history.push(Entry { service: Arc::downgrade(service), recent: VecDeque::new() });
            history.len() - 1
        }
    };
    let recent = &mut history[index].recent;
    if recent.len() == RECENT_COLD_STARTS {
        recent.pop_front();
    }
    recent.push_back(cold_start);
}

/// Returns the recorded cold starts of `service`, oldest first.
pub fn recent(service: &Arc<str>) -> Vec<ColdStart> {
    HISTORY
        .lock()
        .iter()
        .find(|entry| entry.belongs_to(service))
        .map(|entry| entry.recent.iter().copied().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_last_entries_per_service() {
        let first: Arc<str> = Arc::from("history-first");
        let second: Arc<str> = Arc::from("history-first");
        for i in 0..(RECENT_COLD_STARTS + 5) {
            record(&first, Duration::from_millis(100 * i as u64));
        }
        record(&second, Duration::from_secs(7));

        let kept = recent(&first);
        assert_eq!(kept.len(), RECENT_COLD_STARTS);
        assert_eq!(kept[0].seconds, 0.5, "the five oldest are dropped");
        assert_eq!(kept[RECENT_COLD_STARTS - 1].seconds, 2.4);
        assert!(kept.windows(2).all(|pair| pair[0].at_unix_ms <= pair[1].at_unix_ms));

        // Same name, other allocation: another service (such as one of another test).
        assert_eq!(recent(&second).iter().map(|c| c.seconds).collect::<Vec<_>>(), [7.0]);
    }

    #[test]
    fn history_forgets_dropped_service() {
        let name: Arc<str> = Arc::from("history-dropped");
        record(&name, Duration::from_secs(1));
        let weak = Arc::downgrade(&name);
        drop(name);
        // The next record prunes the entry of the freed name.
        let other: Arc<str> = Arc::from("history-other");
        record(&other, Duration::from_secs(2));
        assert!(HISTORY.lock().iter().all(|entry| !Weak::ptr_eq(&entry.service, &weak)));
    }
}
