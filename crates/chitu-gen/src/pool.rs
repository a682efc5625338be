//! A FIFO pool of tasks: add, cancel, run until empty.

use crate::{DiffusionTask, GenError, Generator};
use burn::tensor::backend::Backend;
use std::collections::VecDeque;

/// Handle of a task in a [`TaskPool`].
pub type TaskId = u64;

/// Tasks run in arrival order, one at a time. A failing or cancelled task leaves the others alone.
pub struct TaskPool<B: Backend> {
    queue: VecDeque<(TaskId, DiffusionTask<B>)>,
    next_id: TaskId,
}

impl<B: Backend> Default for TaskPool<B> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            next_id: 0,
        }
    }
}

impl<B: Backend> TaskPool<B> {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a task; returns its id.
    pub fn add(&mut self, task: DiffusionTask<B>) -> TaskId {
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back((id, task));
        id
    }

    /// Removes a queued task; false if no such task is waiting.
    pub fn cancel(&mut self, id: TaskId) -> bool {
        let before = self.queue.len();
        self.queue.retain(|(i, _)| *i != id);
        self.queue.len() != before
    }

    /// Tasks waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no task is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Runs every task to its end in FIFO order; each result is the finished task or its error.
    pub fn run_until_empty(&mut self, generator: &Generator<B>) -> Vec<(TaskId, Result<DiffusionTask<B>, GenError>)> {
        let mut done = Vec::new();
        while let Some((id, task)) = self.queue.pop_front() {
            done.push((id, generator.run(task)));
        }
        done
    }
}
