//! CPU work that nobody waits for: finishing an entry whose clients were already answered
//! with its first bytes (the gzip copy, the parse into elements).
//!
//! It runs on threads of its own at the lowest CPU priority (nice 19). On a host that gives
//! the gateway one core, a request arriving meanwhile then gets the core at once instead of
//! waiting behind the compression, which is done while the core would otherwise idle (for
//! instance while that request waits for the box); on a larger host the threads run beside
//! the runtime's workers. Work that a client does wait for (a selection compressed for it, an
//! entry read back from a tier) stays at normal priority, so a busy host cannot starve it.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

/// The lowest priority an unprivileged thread can take: beside busy threads of normal
/// priority it gets about 1.5% of a core, so it is late, never stuck.
const NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

/// `work` queued for a background thread, whose answer arrives on the receiver (closed
/// without one if `work` panicked); `None` when every thread already has a job waiting, or
/// none could be started: then the caller does the work itself, as it would without these
/// threads. The short queue is what keeps a flood of misses on a busy host from piling up
/// bodies (some of them evicted meanwhile) behind threads that only run when the core is free.
pub fn try_run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<oneshot::Receiver<T>> {
    let (sender, receiver) = oneshot::channel();
    let job: Job = Box::new(move || {
        // The caller may have gone (its task was dropped); the work is simply thrown away.
        let _ = sender.send(work());
    });
    threads().try_send(job).ok()?;
    Some(receiver)
}

/// The queue the background threads take their work from, started on first use: one thread
/// per CPU this process may run on, and room for one job waiting per thread.
fn threads() -> &'static Sender<Job> {
    static QUEUE: OnceLock<Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(count);
        for _ in 0..count {
            let receiver = receiver.clone();
            let started = std::thread::Builder::new()
                .name("miralix-finish".into())
                .spawn(move || {
                    lower_priority();
                    for job in receiver {
                        // A panic drops the job's result sender, so its caller gets `None`;
                        // the thread goes on with the next job.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                });
            if let Err(error) = started {
                tracing::warn!(%error, "could not start a background thread; entries are finished on the runtime's threads instead");
            }
        }
        // With no thread started, the last receiver is gone and `try_run` always refuses.
        sender
    })
}

/// This thread's CPU priority lowered to [`NICE`]. On Linux, `setpriority(PRIO_PROCESS, 0)`
/// applies to the calling thread only. Refused (by a seccomp filter, say), the thread runs at
/// normal priority, as the work would on the runtime's own threads.
fn lower_priority() {
    if let Err(error) = rustix::process::setpriority_process(None, NICE) {
        tracing::debug!(%error, "background thread kept at normal CPU priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `work`'s answer from a background thread, waiting for room in the queue (the other
    /// tests use these threads too).
    async fn on_a_background_thread<T: Send + 'static>(work: fn() -> T) -> Option<T> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(answer) = try_run(work) {
                return answer.await.ok();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the queue stayed full"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(str::to_owned)
    }

    #[tokio::test]
    async fn work_runs_on_a_thread_of_its_own_at_the_lowest_priority() {
        let (name, priority) =
            on_a_background_thread(|| (thread_name(), rustix::process::getpriority_process(None)))
                .await
                .unwrap();
        assert_eq!(name.as_deref(), Some("miralix-finish"));
        assert_eq!(priority.unwrap(), NICE);
        let here = rustix::process::getpriority_process(None).unwrap();
        assert_ne!(
            here, NICE,
            "the caller's thread keeps its priority (run the tests above nice 19)"
        );
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_none_and_the_threads_go_on() {
        // One panic for every thread there is: had a panic ended its thread, nothing would
        // take the last job.
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..count {
            assert_eq!(
                on_a_background_thread(|| -> u32 { panic!("in the work") }).await,
                None
            );
        }
        let name = on_a_background_thread(thread_name).await;
        assert_eq!(name.flatten().as_deref(), Some("miralix-finish"));
    }

    #[tokio::test]
    async fn work_is_refused_once_every_thread_has_a_job_waiting() {
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Each thread busy with one job and one more waiting: the next is refused.
        let mut queued = Vec::new();
        let refused = (0..=2 * count).any(|_| {
            let gate = gate.clone();
            match try_run(move || gate.recv().is_err()) {
                Some(answer) => {
                    queued.push(answer);
                    false
                }
                None => true,
            }
        });
        drop(release);
        assert!(
            refused,
            "{} jobs queued behind {count} threads",
            queued.len()
        );
        for answer in queued {
            assert_eq!(answer.await, Ok(true), "every queued job still ran");
        }
    }
}
