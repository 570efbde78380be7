//! Loopback pod IPs: one per pod, unique among the pods of every fake cluster in
//! this process, and never one whose port another process already uses.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

/// Pod IPs in use by pods of any fake cluster in this process.
static HELD_POD_IPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn held_pod_ips() -> MutexGuard<'static, BTreeSet<u32>> {
    HELD_POD_IPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns 127.b.c.1 with b and c derived from the process id.
pub(super) fn default_pod_ip_start() -> Ipv4Addr {
    let pid = std::process::id();
    let b = 1 + pid % 250;
    let c = 1 + (pid / 250) % 250;
    Ipv4Addr::new(127, b as u8, c as u8, 1)
}

/// Returns the next pod IP candidate after `ip`, skipping 127.0.0.0/24 (where
/// the API server and most test servers listen) and host parts .0 and .255.
fn next_pod_ip(ip: u32) -> u32 {
    let mut next = ip.wrapping_add(1);
    loop {
        let octets = Ipv4Addr::from(next).octets();
        if octets[0] != 127 || (octets[1] == 0 && octets[2] == 0) {
            next = u32::from(Ipv4Addr::new(127, 0, 1, 1));
            continue;
        }
        if octets[3] == 0 || octets[3] == 255 {
            next = next.wrapping_add(1);
            continue;
        }
        return next;
    }
}

/// Picks a pod IP that no pod uses and where `port` is free, because another test
/// process may use the same range.
pub(super) fn allocate_pod_ip(cursor: &mut u32, port: u16) -> Option<Ipv4Addr> {
    for _ in 0..10_000 {
        let candidate = *cursor;
        *cursor = next_pod_ip(candidate);
        let ip = Ipv4Addr::from(candidate);
        let mut held_ips = held_pod_ips();
        if held_ips.contains(&candidate) {
            continue;
        }
        if std::net::TcpListener::bind((ip, port)).is_err() {
            continue;
        }
        held_ips.insert(candidate);
        return Some(ip);
    }
    None
}

pub(super) fn release_pod_ip(ip: Ipv4Addr) {
    held_pod_ips().remove(&u32::from(ip));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_skip_reserved_addresses() {
        let after_254 = next_pod_ip(u32::from(Ipv4Addr::new(127, 0, 1, 254)));
        assert_eq!(Ipv4Addr::from(after_254), Ipv4Addr::new(127, 0, 2, 1));
        let wrapped = next_pod_ip(u32::from(Ipv4Addr::new(127, 255, 255, 254)));
        assert_eq!(Ipv4Addr::from(wrapped), Ipv4Addr::new(127, 0, 1, 1));
    }

    #[test]
    fn allocated_pod_ips_are_unique_until_released() {
        let mut cursor = u32::from(Ipv4Addr::new(127, 0, 9, 1));
        let first = allocate_pod_ip(&mut cursor, 47001).unwrap();
        let mut other_cursor = u32::from(Ipv4Addr::new(127, 0, 9, 1));
        let second = allocate_pod_ip(&mut other_cursor, 47001).unwrap();
        assert_ne!(first, second);
        release_pod_ip(first);
        release_pod_ip(second);
    }
}
