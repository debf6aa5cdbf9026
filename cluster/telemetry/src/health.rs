//! Liveness and readiness.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    gates: Mutex<BTreeMap<&'static str, bool>>,
}

/// Health of the process: live while it runs; ready when every registered
/// [`ReadyGate`] is open and the process is not draining.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// One component's readiness; the process is not ready until every gate is
/// opened. Dropping a gate closes it (a component that died is not ready).
#[derive(Debug)]
pub struct ReadyGate {
    health: Health,
    name: &'static str,
}

impl ReadyGate {
    /// Marks the component ready.
    pub fn open(&self) {
        self.health.set_gate(self.name, true);
    }

    /// Marks the component not ready.
    pub fn close(&self) {
        self.health.set_gate(self.name, false);
    }
}

impl Drop for ReadyGate {
    fn drop(&mut self) {
        self.close();
    }
}

impl Health {
    fn set_gate(&self, name: &'static str, open: bool) {
        let mut gates = self.inner.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.insert(name, open);
    }

    /// Registers a component that starts not ready.
    pub fn gate(&self, name: &'static str) -> ReadyGate {
        self.set_gate(name, false);
        ReadyGate {
            health: self.clone(),
            name,
        }
    }

    /// Enters drain: readiness fails from now on, so load balancers and
    /// lookup stop sending new work.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// True when every gate is open and the process is not draining.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    /// Why the process is not ready (empty when it is).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("draining".to_string());
        }
        let gates = self.inner.gates.lock().unwrap_or_else(|e| e.into_inner());
        if gates.is_empty() {
            reasons.push("starting".to_string());
        }
        for (name, open) in gates.iter() {
            if !open {
                reasons.push(format!("{name} not ready"));
            }
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_gate_is_open_and_not_draining() {
        let h = Health::default();
        assert!(!h.is_ready(), "nothing registered yet");
        let a = h.gate("udp");
        let b = h.gate("tcp");
        a.open();
        assert_eq!(h.not_ready_reasons(), vec!["tcp not ready".to_string()]);
        b.open();
        assert!(h.is_ready());
        drop(b);
        assert!(!h.is_ready(), "a dropped gate closes");
        let c = h.gate("tcp");
        c.open();
        assert!(h.is_ready());
        h.start_draining();
        assert_eq!(h.not_ready_reasons(), vec!["draining".to_string()]);
    }
}
