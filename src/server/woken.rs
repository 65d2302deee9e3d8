//! A future polled only when it has asked to be.
//!
//! A connection's task wakes for every read and write of the connection, and a `select!` polls
//! all of its branches each time, whichever woke it. The connection's rare events (a stop, an
//! idle timeout, a client cancelling most of its requests) were polled that way on every
//! request: a watch, a notify and two timers, each registering its waker again. Wrapped in
//! [`Woken`], they are polled on the first poll and then only after one of them has woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `future`, polled again only once it has woken (see the module).
pub(super) struct Woken<F> {
    future: Pin<Box<F>>,
    flag: Arc<Flag>,
    /// The waker the inner future is polled with: it raises `flag` and wakes the task.
    waker: Waker,
}

/// Raised by the inner future's waker; the task polling [`Woken`] is woken with it.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Woken<F> {
    pub(super) fn new(future: F) -> Self {
        // Raised: the first poll polls the inner future, which registers its waker.
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            future: Box::pin(future),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake in between still wakes this task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.future
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Pending until `ready`; counts its polls and keeps the waker of the last one.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Counts the wakes of the task polling [`Woken`].
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_it_woke() {
        let (polls, waker, ready) = Default::default();
        let probe = Probe {
            polls: Arc::clone(&polls),
            waker: Arc::clone(&waker),
            ready: Arc::clone(&ready),
        };
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let mut woken = std::pin::pin!(Woken::new(probe));

        // The task wakes for other reasons (its connection) many times: one poll inside.
        for _ in 0..10 {
            assert!(woken.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // The inner future wakes: the task is woken, and the next poll reaches it.
        let inner = waker.lock().unwrap().take().unwrap();
        ready.store(true, Ordering::SeqCst);
        inner.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(woken.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
