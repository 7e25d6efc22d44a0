//! The replay buffer shared by every call of a balancer: request bytes kept so a call
//! can be sent again are taken from it and given back when let go.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Bytes kept for replays by every call together, up to a limit (16 MiB by default).
#[derive(Debug, Clone)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget { used: Arc::new(AtomicUsize::new(0)), limit }
    }

    /// Bytes kept now, by every call.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if the limit allows; whether it did.
    pub fn take(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back `n` bytes taken before.
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Bytes one call holds of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Budget,
    n: usize,
}

impl Held {
    pub fn new(budget: &Budget) -> Self {
        Held { budget: budget.clone(), n: 0 }
    }

    /// Takes `n` more bytes if the budget allows; whether it did.
    pub fn take(&mut self, n: usize) -> bool {
        let taken = self.budget.take(n);
        self.n += if taken { n } else { 0 };
        taken
    }

    /// Gives back all it holds.
    pub fn give_all(&mut self) {
        self.budget.give(std::mem::take(&mut self.n));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.give_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_call_holds_is_given_back_when_it_lets_go() {
        let budget = Budget::new(10);
        let mut a = Held::new(&budget);
        let mut b = Held::new(&budget);
        assert!(a.take(6));
        assert!(!b.take(6), "6 + 6 exceed 10");
        assert!(b.take(4));
        assert_eq!(budget.used(), 10);
        a.give_all();
        assert_eq!(budget.used(), 4);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
