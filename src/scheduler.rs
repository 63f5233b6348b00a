//! Upstream slots: each provider runs at most `max_concurrent` streams; the rest wait in a
//! priority queue.
//!
//! Order: a waiter's key is its arrival time minus `priority × aging`. Higher tiers are served
//! first, arrival order holds within a tier, and a stream can only be overtaken by a stream
//! of a tier `k` levels higher that arrived less than `k × aging` after it. That is the
//! starvation bound: a free stream (priority 0) waits at most as long as it takes to serve
//! what was queued before it plus what higher tiers send in the next `2 × aging` (with
//! enterprise at priority 2), never indefinitely.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Queueing, for every provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Head start per priority level. Default 2000 ms.
    pub aging_ms: u64,
    /// Streams waiting per provider; beyond it `overloaded`. Default 1000.
    pub queue_max_len: usize,
    /// Longest wait for a slot; beyond it `overloaded`. Default 30000 ms.
    pub queue_max_wait_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            aging_ms: 2_000,
            queue_max_len: 1_000,
            queue_max_wait_ms: 30_000,
        }
    }
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    QueueFull,
    Timeout,
    Cancelled,
}

type Key = (i128, u64);

/// Waiters at the first positions hear of every move at once: that is where moves matter.
pub const ANNOUNCE_HEAD: usize = 32;
/// Positions behind the head are refreshed by a walk of the whole queue at most this often
/// (on a queue change), so a change costs `O(ANNOUNCE_HEAD)`, not `O(queue_max_len)`.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// Told a waiter's 1-based queue position each time it changes (the stream's `queued`
/// frame). Called under the queue's lock: it must be quick and must not call the scheduler.
type OnPosition = Box<dyn Fn(usize) + Send>;

struct Waiter {
    grant: oneshot::Sender<()>,
    on_position: OnPosition,
    tier: Arc<str>,
    /// Last position sent, so moves are announced once.
    position: usize,
}

struct State {
    active: usize,
    queue: BTreeMap<Key, Waiter>,
    next_seq: u64,
    /// Waiting streams per tier (for the queue-depth gauge).
    depth: HashMap<Arc<str>, usize>,
    /// When every waiter's position was last refreshed.
    walked_all: Option<Instant>,
}

/// One provider's slots and queue.
pub struct Scheduler {
    max_concurrent: usize,
    config: SchedulerConfig,
    /// Zero point of the queue keys.
    epoch: Instant,
    state: Mutex<State>,
}

/// A held upstream slot; dropping it passes the slot to the next waiter.
pub struct Slot {
    scheduler: Arc<Scheduler>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.scheduler.release();
    }
}

impl Scheduler {
    pub fn new(max_concurrent: usize, config: SchedulerConfig) -> Arc<Self> {
        Arc::new(Scheduler {
            max_concurrent: max_concurrent.max(1),
            config,
            epoch: Instant::now(),
            state: Mutex::new(State {
                active: 0,
                queue: BTreeMap::new(),
                next_seq: 0,
                depth: HashMap::new(),
                walked_all: None,
            }),
        })
    }

    /// Waits for a slot, telling `on_position` the waiter's place in the queue as it moves.
    /// Gives up when the queue is full, after `queue_max_wait_ms`, or when `cancelled`
    /// completes (the place is freed at once).
    pub async fn acquire(
        self: &Arc<Self>,
        tier: &Arc<str>,
        priority: u32,
        cancelled: impl Future<Output = ()>,
        on_position: impl Fn(usize) + Send + 'static,
    ) -> Result<Slot, NoSlot> {
        let (key, granted) = {
            let mut st = self.state.lock();
            if st.active < self.max_concurrent && st.queue.is_empty() {
                st.active += 1;
                return Ok(Slot {
                    scheduler: self.clone(),
                });
            }
            if st.queue.len() >= self.config.queue_max_len {
                return Err(NoSlot::QueueFull);
            }
            let now = Instant::now()
                .saturating_duration_since(self.epoch)
                .as_nanos() as i128;
            let head_start = i128::from(priority) * i128::from(self.config.aging_ms) * 1_000_000;
            let key = (now - head_start, st.next_seq);
            st.next_seq += 1;
            let (grant, granted) = oneshot::channel();
            st.queue.insert(
                key,
                Waiter {
                    grant,
                    on_position: Box::new(on_position),
                    tier: tier.clone(),
                    position: 0,
                },
            );
            *st.depth.entry(tier.clone()).or_default() += 1;
            announce(&mut st, Some(key));
            (key, granted)
        };
        let max_wait = Duration::from_millis(self.config.queue_max_wait_ms);
        let outcome = tokio::select! {
            r = granted => return match r {
                Ok(()) => Ok(Slot { scheduler: self.clone() }),
                // The sender is only dropped after being removed by `leave`, which we have not
                // called: treat it as a timeout rather than hang.
                Err(_) => Err(NoSlot::Timeout),
            },
            _ = tokio::time::sleep(max_wait) => NoSlot::Timeout,
            _ = cancelled => NoSlot::Cancelled,
        };
        if self.leave(key) {
            Err(outcome)
        } else {
            // The slot was handed over just as we gave up: give it on.
            self.release();
            Err(outcome)
        }
    }

    /// Removes a waiter; `false` if it was no longer queued (it had been granted a slot).
    fn leave(&self, key: Key) -> bool {
        let mut st = self.state.lock();
        match st.queue.remove(&key) {
            Some(w) => {
                decrement(&mut st.depth, &w.tier);
                announce(&mut st, None);
                true
            }
            None => false,
        }
    }

    fn release(&self) {
        let mut st = self.state.lock();
        while let Some((_, w)) = st.queue.pop_first() {
            decrement(&mut st.depth, &w.tier);
            if w.grant.send(()).is_ok() {
                announce(&mut st, None);
                return;
            }
        }
        st.active = st.active.saturating_sub(1);
    }

    /// Streams running and waiting, and waiting per tier.
    pub fn load(&self) -> (usize, usize, Vec<(Arc<str>, usize)>) {
        let st = self.state.lock();
        let depth = st.depth.iter().map(|(t, n)| (t.clone(), *n)).collect();
        (st.active, st.queue.len(), depth)
    }
}

fn decrement(depth: &mut HashMap<Arc<str>, usize>, tier: &Arc<str>) {
    if let Some(n) = depth.get_mut(tier) {
        *n = n.saturating_sub(1);
    }
}

/// Sends waiters whose place changed their new 1-based position: the first
/// [`ANNOUNCE_HEAD`] on every change, everyone at most once per [`ANNOUNCE_EVERY`]. A waiter
/// that just `entered` behind the head is told at once too: its exact place when it is last
/// (the common case), else the queue's length, an upper bound until the next full walk.
fn announce(st: &mut State, entered: Option<Key>) {
    let now = Instant::now();
    let full = st
        .walked_all
        .is_none_or(|at| now.duration_since(at) >= ANNOUNCE_EVERY);
    let walk = if full {
        st.walked_all = Some(now);
        st.queue.len()
    } else {
        ANNOUNCE_HEAD
    };
    for (i, w) in st.queue.values_mut().take(walk).enumerate() {
        if w.position != i + 1 {
            w.position = i + 1;
            (w.on_position)(i + 1);
        }
    }
    if let Some(key) = entered.filter(|_| st.queue.len() > walk) {
        let len = st.queue.len();
        if let Some(w) = st.queue.get_mut(&key) {
            w.position = len;
            (w.on_position)(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// A waiter's side of the queue: its cancel switch and the last position it was told.
    #[derive(Clone, Default)]
    struct Probe {
        cancel: CancellationToken,
        position: Arc<Mutex<Option<usize>>>,
    }

    impl Probe {
        async fn acquire(
            &self,
            s: &Arc<Scheduler>,
            tier: &str,
            priority: u32,
        ) -> Result<Slot, NoSlot> {
            let position = self.position.clone();
            let cancel = self.cancel.clone();
            s.acquire(
                &tier.into(),
                priority,
                async move { cancel.cancelled().await },
                move |p| *position.lock() = Some(p),
            )
            .await
        }
    }

    fn cfg(aging_ms: u64, max_len: usize, max_wait_ms: u64) -> SchedulerConfig {
        SchedulerConfig {
            aging_ms,
            queue_max_len: max_len,
            queue_max_wait_ms: max_wait_ms,
        }
    }

    /// Queues `id` and returns the task that will hold its slot until told to let go.
    fn waiter(
        s: &Arc<Scheduler>,
        id: &str,
        tier: &str,
        priority: u32,
        order: &Arc<Mutex<Vec<String>>>,
    ) -> (Probe, tokio::task::JoinHandle<Result<(), NoSlot>>) {
        let probe = Probe::default();
        let (s, p2, tier, order, id) = (
            s.clone(),
            probe.clone(),
            tier.to_string(),
            order.clone(),
            id.to_string(),
        );
        let task = tokio::spawn(async move {
            let slot = p2.acquire(&s, &tier, priority).await?;
            order.lock().push(id);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
            Ok(())
        });
        (probe, task)
    }

    fn last_queued(p: &Probe) -> Option<u64> {
        p.position.lock().map(|p| p as u64)
    }

    #[tokio::test(start_paused = true)]
    async fn higher_tier_first_fifo_within_tier() {
        let s = Scheduler::new(1, cfg(2_000, 100, 60_000));
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = Probe::default()
            .acquire(&s, "free", 0)
            .await
            .expect("free slot");
        let (a, ta) = waiter(&s, "free-a", "free", 0, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (b, tb) = waiter(&s, "free-b", "free", 0, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (p, tp) = waiter(&s, "pro-p", "pro", 1, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(last_queued(&p), Some(1), "pro jumps the free queue");
        assert_eq!(last_queued(&a), Some(2));
        assert_eq!(last_queued(&b), Some(3));
        let (_, _, depth) = s.load();
        assert_eq!(
            depth.iter().find(|(t, _)| &**t == "free").map(|d| d.1),
            Some(2)
        );
        drop(holder);
        for t in [ta, tb, tp] {
            t.await.expect("join").expect("served");
        }
        assert_eq!(*order.lock(), vec!["pro-p", "free-a", "free-b"]);
        assert_eq!(s.load().0, 0, "all slots returned");
    }

    #[tokio::test(start_paused = true)]
    async fn aging_bounds_the_wait_of_a_lower_tier() {
        let s = Scheduler::new(1, cfg(1_000, 100, 60_000));
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = Probe::default().acquire(&s, "free", 0).await.expect("slot");
        let (_, tf) = waiter(&s, "free", "free", 0, &order);
        // A pro stream arriving within the 1 s head start goes first; one arriving later does not.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let (_, tp1) = waiter(&s, "pro-early", "pro", 1, &order);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, tp2) = waiter(&s, "pro-late", "pro", 1, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(holder);
        for t in [tf, tp1, tp2] {
            t.await.expect("join").expect("served");
        }
        assert_eq!(*order.lock(), vec!["pro-early", "free", "pro-late"]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_timeout_and_cancel() {
        let s = Scheduler::new(1, cfg(1_000, 2, 5_000));
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = Probe::default().acquire(&s, "free", 0).await.expect("slot");
        let (a, ta) = waiter(&s, "a", "free", 0, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (b, tb) = waiter(&s, "b", "free", 0, &order);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let full = Probe::default().acquire(&s, "free", 0).await;
        assert_eq!(full.err(), Some(NoSlot::QueueFull));
        a.cancel.cancel();
        assert_eq!(ta.await.expect("join"), Err(NoSlot::Cancelled));
        assert_eq!(s.load().1, 1, "the cancelled waiter left at once");
        assert_eq!(last_queued(&b), Some(1), "b moved up");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(tb.await.expect("join"), Err(NoSlot::Timeout));
        drop(holder);
        assert_eq!(s.load(), (0, 0, s.load().2));
    }
}
