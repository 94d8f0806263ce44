//! The tasks an engine runs beside its workers — a follower of its events
//! or tasks, the drains of workers' output, background cleanups — owned
//! by the engine and ended by the run's stop, never left to the runtime.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
pub struct EngineTasks {
    tracker: TaskTracker,
    /// Ends the followers, which never end by themselves.
    followers: CancellationToken,
    /// Ends the rest, once they had their time.
    all: CancellationToken,
}

impl EngineTasks {
    /// A task that runs until [`EngineTasks::end`].
    pub fn follow(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let (followers, all) = (self.followers.clone(), self.all.clone());
        self.tracker.spawn(async move {
            tokio::select! {
                _ = followers.cancelled() => {}
                _ = all.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// A task that ends by itself (a drain ends with its stream); `end`
    /// waits for it a while.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let all = self.all.clone();
        self.tracker.spawn(async move {
            all.run_until_cancelled(fut).await;
        });
    }

    /// Stops the followers, gives the rest `grace` to finish (a drain still
    /// writes a worker's last lines), then ends them; returns when all
    /// have ended, with how many were cut short.
    pub async fn end(&self, grace: Duration) -> usize {
        self.followers.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_ok() {
            return 0;
        }
        let cut = self.tracker.len();
        self.all.cancel();
        self.tracker.wait().await;
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn followers_end_at_once_the_rest_get_their_grace_then_end() {
        let tasks = EngineTasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.follow(std::future::pending());
        // A drain that finishes within the grace period.
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(()).unwrap();
        });
        let started = tokio::time::Instant::now();
        assert_eq!(tasks.end(Duration::from_secs(5)).await, 0);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        rx.await.unwrap();

        let tasks = EngineTasks::default();
        tasks.spawn(std::future::pending());
        tasks.spawn(std::future::pending());
        let started = tokio::time::Instant::now();
        assert_eq!(tasks.end(Duration::from_secs(5)).await, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
