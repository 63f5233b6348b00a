//! The threads that serve connections: one single-threaded tokio runtime per worker, each
//! connection handed to one of them whole.
//!
//! A relayed chunk goes through three tasks: the upstream connection's (hyper reads and
//! de-chunks the socket), the stream's (parses the event, appends the `delta`), and the
//! WebSocket's writer. On tokio's work-stealing runtime they wake each other across worker
//! threads, so every chunk paid futex wake-ups and task switches, most of the gateway's CPU
//! under load. Here a connection, the streams it opens and their upstream calls (each worker
//! has its own upstream client pool, see [`current`]) live on one thread: a chunk's wake-ups
//! stay in one run queue and cost no system call. Connections spread over the workers round
//! robin, as an accepting nginx worker would.
//!
//! What crosses workers still works, only slower: a stream resumed on a connection another
//! worker serves keeps its task where it started, and its frames wake the new writer through
//! the same [`tokio::sync::Notify`] as before.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker number; `None` off the workers (the accept loop, tests).
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker this thread belongs to, if any: picks its upstream client, so a pooled
/// connection's task and the streams reading it share a thread.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The worker runtimes. Dropping it stops them: tasks still on them are dropped.
pub struct Workers {
    handles: Vec<Handle>,
    /// Round-robin cursor over `handles`.
    next: AtomicUsize,
    /// Each worker's thread, and the sender that tells it to stop.
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each running its own runtime.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let count = count.max(1);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("muxgate-worker-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropped here, on its own thread: its tasks are dropped where they ran.
                    drop(runtime);
                })?;
            threads.push((stop, thread));
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The next worker's runtime, round robin.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            // Not joined: a worker may be this thread's caller's own (dropping it from a task
            // would deadlock), and its runtime ends its tasks on its own.
            drop(thread);
        }
    }
}

/// The number of workers when the config leaves it to the machine: one per CPU this process
/// may run on (`taskset` and cgroup limits included).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_thread() {
        let workers = Workers::start(2).expect("workers");
        assert_eq!(workers.count(), 2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            workers.next().spawn(async move {
                // A task spawned from inside a worker stays on that worker too.
                let inner = tokio::spawn(async { current() }).await.ok().flatten();
                let _ = tx.send((current(), inner));
            });
            let (outer, inner) = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("ran");
            assert_eq!(outer, inner);
            seen.push(outer.expect("on a worker"));
        }
        assert_eq!(seen, vec![0, 1, 0, 1], "round robin");
        assert_eq!(current(), None, "the test's own thread is no worker");
    }
}
