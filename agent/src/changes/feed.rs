//! The hand-over of changes from the watcher thread to the pipeline. Besides the changes it
//! carries a watermark: the time up to which everything the kernel reported has been read.
//! A drop is explained only once the watermark has passed it, so a change that preceded the
//! drop is never missed because its record was still in a ring or a socket.
use std::{
    collections::VecDeque,
    os::fd::{AsFd, BorrowedFd},
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::Notify;

use super::Change;

/// The pipeline's end.
pub struct Feed {
    shared: Arc<Shared>,
}

/// The watcher thread's end. Dropping it closes the feed (nobody waits for it any more).
pub struct Publisher {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    advanced: Condvar,
    /// Wakes the session's event loop when changes are queued.
    queued: Notify,
    /// Wakes the watcher thread for an immediate pass.
    wake: EventFd,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Change>,
    /// Every change made before this time (CLOCK_MONOTONIC ns) is in `queue` or was taken.
    watermark: u64,
    closed: bool,
}

/// A connected pair.
pub fn feed() -> std::io::Result<(Feed, Publisher)> {
    let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        advanced: Condvar::new(),
        queued: Notify::new(),
        wake,
    });
    Ok((
        Feed {
            shared: shared.clone(),
        },
        Publisher { shared },
    ))
}

impl Feed {
    /// Resolves when changes may be waiting (cancel-safe; a notification sent while nobody
    /// waited is kept).
    pub async fn queued(&self) {
        self.shared.queued.notified().await
    }

    /// The changes queued so far.
    pub fn take(&self) -> Vec<Change> {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.queue.drain(..).collect()
    }

    /// Waits (at most `patience`) until every change made up to `ts_ns` is queued, asking the
    /// watcher for an immediate pass; takes nothing. Says whether it is.
    pub fn wait_for(&self, ts_ns: u64, patience: Duration) -> bool {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.watermark < ts_ns && !s.closed {
            let _ = self.shared.wake.write(1);
            s = self
                .shared
                .advanced
                .wait_timeout_while(s, patience, |s| s.watermark < ts_ns && !s.closed)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.watermark >= ts_ns
    }

    /// Asks the watcher for an immediate pass (to stop promptly, or to read what is pending).
    pub fn nudge(&self) {
        let _ = self.shared.wake.write(1);
    }
}

impl Publisher {
    /// Queues `changes`, all that was made before `watermark`.
    pub fn publish(&self, changes: Vec<Change>, watermark: u64) {
        let any = !changes.is_empty();
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.queue.extend(changes);
            s.watermark = s.watermark.max(watermark);
        }
        self.shared.advanced.notify_all();
        if any {
            self.shared.queued.notify_one();
        }
    }

    /// Readable when the pipeline asks for a pass.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Acknowledges a wake-up.
    pub fn woken(&self) {
        let _ = self.shared.wake.read();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.advanced.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{feed, Change};
    use crate::changes::ChangeKind;

    fn change(ts_ns: u64) -> Change {
        Change::example(1, ts_ns, ChangeKind::Sysctl, "net.ipv4.ip_forward")
    }

    #[test]
    fn a_drop_waits_for_the_pass_that_covers_it() {
        let (f, p) = feed().unwrap();
        p.publish(vec![change(5)], 10);
        assert!(f.wait_for(10, Duration::ZERO));
        let publisher = std::thread::spawn(move || {
            // The watcher's poll wakes on the pipeline's request.
            let mut fds = [nix::poll::PollFd::new(p.wake_fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
            p.woken();
            p.publish(vec![change(15)], 20);
            p
        });
        assert!(f.wait_for(18, Duration::from_secs(5)));
        let got = f.take();
        assert_eq!(got.iter().map(|c| c.ts_ns).collect::<Vec<_>>(), [5, 15]);
        drop(publisher.join().unwrap());
        // A closed feed does not make anyone wait.
        let t = Instant::now();
        assert!(!f.wait_for(100, Duration::from_secs(5)));
        assert!(f.take().is_empty());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
