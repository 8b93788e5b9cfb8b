//! A small tokio runtime owned by a store whose interface blocks (the PostgreSQL job store, the S3
//! model store): their callers are training threads and `spawn_blocking`, sometimes code that runs
//! inside another runtime, which may neither block on nor drop one.

use std::future::Future;

pub(crate) struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    pub(crate) fn new(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    /// Runs `fut` to its end from any thread: on a scoped thread when called from inside a
    /// runtime. A panic inside becomes `panicked()`.
    pub(crate) fn run<T: Send, E: Send>(
        &self,
        fut: impl Future<Output = Result<T, E>> + Send,
        panicked: impl FnOnce() -> E,
    ) -> Result<T, E> {
        let runtime = self
            .0
            .as_ref()
            .expect("the runtime lives as long as its owner");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| runtime.block_on(fut))
                    .join()
                    .unwrap_or_else(|_| Err(panicked()))
            })
        } else {
            runtime.block_on(fut)
        }
    }
}

impl OwnRuntime {
    /// Runs `fut` in the background until it ends or the runtime is dropped.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let runtime = self
            .0
            .as_ref()
            .expect("the runtime lives as long as its owner");
        drop(runtime.spawn(fut));
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime's own thread may not do.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
