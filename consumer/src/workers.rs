//! Long-lived delivery tasks: the dispatcher hands each delivery (one record, or a batch)
//! to an idle task instead of spawning a task per delivery.
//!
//! Tasks are started as deliveries need them, up to the in-flight bound, and stay while the
//! dispatcher lives; once it is dropped they finish what they run and end. Measured against
//! a task per delivery in docs/sidecar.md ("Long-lived delivery tasks").

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::deliver::Deliverer;
use crate::dispatch::Follow;
use crate::progress::Progress;
use crate::record::Record;

/// What a task does with a job.
pub trait Runner: Send + Sync + 'static {
    type Job: Send + 'static;
    fn run_job(self: Arc<Self>, job: Self::Job) -> impl Future<Output = ()> + Send;
}

/// One delivery: a record (and, in `partition` ordering, what lets the task go on with the
/// partition's next ones), or a batch of one partition's records, with its progress.
pub enum Job {
    Record(Record, Arc<Progress>, Option<Follow>),
    Batch(Vec<Record>, Arc<Progress>),
}

impl Runner for Deliverer {
    type Job = Job;
    async fn run_job(self: Arc<Self>, job: Job) {
        match job {
            Job::Record(record, progress, follow) => self.run(record, progress, follow).await,
            Job::Batch(records, progress) => self.run_batch(records, progress).await,
        }
    }
}

struct Shared<J> {
    jobs: Mutex<VecDeque<J>>,
    ready: Notify,
    closed: AtomicBool,
}

impl<J> Shared<J> {
    fn jobs(&self) -> MutexGuard<'_, VecDeque<J>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Workers<R: Runner> {
    shared: Arc<Shared<R::Job>>,
    runner: Arc<R>,
    started: usize,
    max: usize,
}

impl<R: Runner> Workers<R> {
    /// At most `max` tasks (the in-flight bound; at least one).
    pub fn new(runner: Arc<R>, max: usize) -> Workers<R> {
        Workers {
            shared: Arc::new(Shared {
                jobs: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
                closed: AtomicBool::new(false),
            }),
            runner,
            started: 0,
            max: max.max(1),
        }
    }

    /// Hands `job` to an idle task. `running` counts the jobs handed over and not yet
    /// reported ended, this one included: while there are fewer tasks, one more is
    /// started, so a job never waits for another to end.
    pub fn start(&mut self, job: R::Job, running: usize) {
        self.shared.jobs().push_back(job);
        if self.started < running.min(self.max) {
            self.started += 1;
            tokio::spawn(work(self.shared.clone(), self.runner.clone()));
        }
        // The task that went idle last: its stack and caches are the warmest.
        self.shared.ready.notify_last();
    }

    /// Tasks started so far.
    pub fn started(&self) -> usize {
        self.started
    }
}

impl<R: Runner> Drop for Workers<R> {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.ready.notify_waiters();
    }
}

/// One task: takes jobs until the pool is dropped and no job is left.
async fn work<R: Runner>(shared: Arc<Shared<R::Job>>, runner: Arc<R>) {
    loop {
        let job = {
            let mut notified = std::pin::pin!(shared.ready.notified());
            loop {
                // Registered before the queue is looked at, so that a job pushed, or the
                // close, after the look still wakes this task. A wake-up this task did not
                // need (it found a job anyway) passes on to another waiting task when the
                // `Notified` is dropped.
                notified.as_mut().enable();
                if let Some(job) = shared.jobs().pop_front() {
                    break Some(job);
                }
                if shared.closed.load(Ordering::SeqCst) {
                    break None;
                }
                notified.as_mut().await;
                notified.set(shared.ready.notified());
            }
        };
        match job {
            Some(job) => runner.clone().run_job(job).await,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::{Semaphore, mpsc};

    /// Records which jobs ran, how many ran at once, and ends each job when told to.
    struct Probe {
        done: mpsc::UnboundedSender<usize>,
        running: AtomicUsize,
        most: AtomicUsize,
        gate: Semaphore,
    }

    impl Runner for Probe {
        type Job = usize;
        async fn run_job(self: Arc<Self>, job: usize) {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            self.running.fetch_sub(1, Ordering::SeqCst);
            let _ = self.done.send(job);
        }
    }

    fn probe(open: bool) -> (Arc<Probe>, mpsc::UnboundedReceiver<usize>) {
        let (done, rx) = mpsc::unbounded_channel();
        let gate = if open {
            Semaphore::new(Semaphore::MAX_PERMITS)
        } else {
            Semaphore::new(0)
        };
        let p = Probe {
            done,
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            gate,
        };
        (Arc::new(p), rx)
    }

    /// A pool of at most `n` tasks with `n` jobs handed over, all held at the gate.
    fn held(n: usize) -> (Arc<Probe>, mpsc::UnboundedReceiver<usize>, Workers<Probe>) {
        let (p, rx) = probe(false);
        let mut w = Workers::new(p.clone(), n);
        for job in 0..n {
            w.start(job, job + 1);
        }
        (p, rx, w)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<usize>) -> usize {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a job ended within 10 s")
            .expect("the probe is alive")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_up_to_the_bound_run_at_once_and_a_task_serves_many_jobs_in_turn() {
        let (p, mut rx, mut w) = held(3);
        assert_eq!(w.started(), 3, "one task per job running at once");
        tokio::time::timeout(Duration::from_secs(10), async {
            while p.running.load(Ordering::SeqCst) < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the three jobs run at once");
        // As the dispatcher does: a new job only once one ended, on the same tasks.
        let mut ended = Vec::new();
        for job in 3..200 {
            p.gate.add_permits(1);
            ended.push(next(&mut rx).await);
            w.start(job, 3);
        }
        p.gate.add_permits(3);
        for _ in 0..3 {
            ended.push(next(&mut rx).await);
        }
        ended.sort_unstable();
        assert_eq!(
            ended,
            (0..200).collect::<Vec<_>>(),
            "each job ran exactly once"
        );
        assert_eq!(w.started(), 3, "no task beyond the bound");
        assert_eq!(p.most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_handed_over_before_the_end_of_another_was_heard_still_runs_at_once() {
        // The dispatcher counts a slot free when the end is reported, a moment before the
        // task looks for its next job: the job waits in the queue, and is not lost.
        let (p, mut rx) = probe(true);
        let mut w = Workers::new(p.clone(), 4);
        let mut running = 0;
        for job in 0..20_000 {
            if running == 4 {
                next(&mut rx).await;
                running -= 1;
            }
            running += 1;
            w.start(job, running);
        }
        for _ in 0..running {
            next(&mut rx).await;
        }
        assert!(w.started() <= 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_pool_ends_idle_tasks_and_lets_running_jobs_finish() {
        let (p, mut rx, w) = held(4);
        p.gate.add_permits(2);
        next(&mut rx).await;
        next(&mut rx).await;
        drop(w);
        p.gate.add_permits(2);
        next(&mut rx).await;
        next(&mut rx).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            // Each task holds the runner; only the test's handle is left once all ended.
            while Arc::strong_count(&p) > 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("every task ended after the pool was dropped");
    }
}
