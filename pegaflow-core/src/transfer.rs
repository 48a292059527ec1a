//! Layer-wise saves and loads between an engine's KV cache and pool slots.
//!
//! [`KvTransfer`] owns a validated [`KvLayout`] and a copy backend.
//!
//! * **Save** ([`KvTransfer::save`]): called once per layer (segment) right
//!   after the forward pass queued it, naming the engine's stream. The copy
//!   runs on the transfer's own save stream, which waits (on the GPU, the
//!   host never blocks) for an event recorded on the engine's stream: the
//!   copy starts once the layer is computed and never holds up the compute
//!   queued after it. An event is recorded after the copy.
//!   [`KvTransfer::save_done`] queries or waits for everything saved so
//!   far; commit the slots once it returns true. The save event is
//!   interprocess, so another engine can wait for it on its own stream
//!   ([`KvTransfer::save_event_handle`]).
//! * **Load** ([`KvTransfer::load`]): enqueues one copy per segment and
//!   records a per-segment event, so [`KvTransfer::wait_layer`] (host) or
//!   [`KvTransfer::stream_wait_layer`] (GPU-side) wait only until that layer
//!   has arrived, and layer `l`'s attention can start while layer `l + 1`
//!   is still in flight.
//!
//! With the host backend everything completes inside the call and the
//! waits return at once.

use std::ops::Range;
use std::sync::Arc;

use thiserror::Error;

use crate::copy::{CopyBackend, CopyError, Direction};
use crate::cuda::{ipc, CudaDevice, CudaError, Event, HostRegistration, Stream, StreamRef};
use crate::layout::{KvLayout, LayoutError, Piece, PlanError};

/// Transfer failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TransferError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Ipc(#[from] ipc::IpcError),
    #[error("the {0} copy backend is asynchronous and needs the CUDA device it copies on")]
    NeedsDevice(&'static str),
    #[error("slot {addr:#x} (+{len} bytes) is outside the registered pool {base:#x}..{end:#x}")]
    SlotOutsidePool {
        addr: usize,
        len: usize,
        base: usize,
        end: usize,
    },
    #[error("layer {layer} out of range (the layout has {segments} segments)")]
    LayerOutOfRange { layer: usize, segments: usize },
}

/// See the module docs.
#[derive(Debug)]
pub struct KvTransfer {
    layout: KvLayout,
    backend: Arc<dyn CopyBackend>,
    device: Option<Arc<CudaDevice>>,
    pool: Option<Arc<HostRegistration>>,
    scratch: Vec<Piece>,
    save_event: Option<Event>,
    /// Where saves run, so the copies overlap the engine's compute instead
    /// of sitting between its kernels.
    save_stream: Option<Stream>,
    /// Recorded on the engine's stream before a save: the save stream waits
    /// for it.
    save_ready: Option<Event>,
    load_events: Vec<Event>,
}

impl KvTransfer {
    /// Validates `layout`. `device` is required for the GPU backends.
    pub fn new(
        layout: KvLayout,
        backend: Arc<dyn CopyBackend>,
        device: Option<Arc<CudaDevice>>,
    ) -> Result<Self, TransferError> {
        layout.validate()?;
        let (save_event, save_stream, save_ready, load_events) = if backend.is_synchronous() {
            (None, None, None, Vec::new())
        } else {
            let d = device
                .as_ref()
                .ok_or(TransferError::NeedsDevice(backend.name()))?;
            let save = Event::interprocess(d)?;
            let loads = (0..layout.num_segments())
                .map(|_| Event::new(d))
                .collect::<Result<Vec<_>, _>>()?;
            (
                Some(save),
                Some(Stream::new(d)?),
                Some(Event::new(d)?),
                loads,
            )
        };
        Ok(KvTransfer {
            layout,
            backend,
            device,
            pool: None,
            scratch: Vec::new(),
            save_event,
            save_stream,
            save_ready,
            load_events,
        })
    }

    /// Checks every slot address against this registered pool before
    /// copying (an address outside a registered range would make the copy
    /// kernel fault and poison the engine's CUDA context).
    pub fn with_pool(mut self, pool: Arc<HostRegistration>) -> Self {
        self.pool = Some(pool);
        self
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn backend(&self) -> &Arc<dyn CopyBackend> {
        &self.backend
    }

    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.device.as_ref()
    }

    fn plan(
        &mut self,
        gpu_blocks: &[u32],
        slots: &[usize],
        segments: Range<usize>,
    ) -> Result<(), TransferError> {
        if let Some(pool) = &self.pool {
            let len = self.layout.slot_bytes();
            for &s in slots {
                if !pool.contains(s, len) {
                    return Err(TransferError::SlotOutsidePool {
                        addr: s,
                        len,
                        base: pool.base(),
                        end: pool.base() + pool.len(),
                    });
                }
            }
        }
        self.scratch.clear();
        self.layout
            .plan_into(gpu_blocks, slots, segments, &mut self.scratch)?;
        Ok(())
    }

    /// Copies `segments` of `gpu_blocks[i]` into slot `slots[i]` once the
    /// work already queued on `stream` (the layer's compute) is done, on the
    /// transfer's own save stream, and records the save event.
    ///
    /// # Safety
    /// `slots` are addresses of slots of [`KvLayout::slot_bytes`] this
    /// engine may write (taken from its stash) in memory the backend can
    /// reach (the registered pool for GPU backends); the KV cache the
    /// layout describes is alive; neither is freed or reused before
    /// [`KvTransfer::save_done`] returns true.
    pub unsafe fn save(
        &mut self,
        segments: Range<usize>,
        gpu_blocks: &[u32],
        slots: &[usize],
        stream: StreamRef,
    ) -> Result<(), TransferError> {
        self.plan(gpu_blocks, slots, segments)?;
        let on = match (&self.save_stream, &self.save_ready) {
            (Some(side), Some(ready)) => {
                ready.record(stream)?;
                ready.wait_on(side.as_ref())?;
                side.as_ref()
            }
            _ => stream,
        };
        // SAFETY: the pieces come from a validated layout and in-range
        // block ids (plan checked them); the caller guarantees the memory.
        unsafe {
            self.backend
                .copy(&self.scratch, Direction::DeviceToHost, on)?
        };
        if let Some(e) = &self.save_event {
            e.record(on)?;
        }
        Ok(())
    }

    /// Makes `stream` wait (on the GPU) for every save queued so far. An
    /// engine calls it before the next step's compute: saves run on their
    /// own stream, and a block they still read must not be rewritten by a
    /// later step (a block vLLM freed and handed to another request).
    pub fn stream_wait_saves(&self, stream: StreamRef) -> Result<(), TransferError> {
        match (&self.save_event, &self.save_stream) {
            (Some(e), Some(_)) => e.wait_on(stream).map_err(Into::into),
            _ => Ok(()),
        }
    }

    /// True when every save queued so far has completed; with `wait`,
    /// blocks until then.
    pub fn save_done(&self, wait: bool) -> Result<bool, TransferError> {
        match &self.save_event {
            None => Ok(true),
            Some(e) if wait => e.synchronize().map(|()| true).map_err(Into::into),
            Some(e) => e.query().map_err(Into::into),
        }
    }

    /// The interprocess save event, for the owner to broker: another engine
    /// imports it ([`ipc::import_event`]) and waits on it on its stream.
    /// `None` for the host backend.
    pub fn save_event_handle(&self) -> Result<Option<[u8; ipc::IPC_HANDLE_BYTES]>, TransferError> {
        self.save_event
            .as_ref()
            .map(ipc::export_event)
            .transpose()
            .map_err(Into::into)
    }

    /// Copies `segments` from slot `slots[i]` into `gpu_blocks[i]`, one
    /// copy per segment, each followed by that segment's event.
    ///
    /// # Safety
    /// `slots` hold committed blocks of this layout's namespace that this
    /// engine has pinned, in memory the backend can reach; the destination
    /// GPU blocks are not read or written by other work until their layer
    /// has arrived ([`KvTransfer::wait_layer`]); slots stay pinned until
    /// then.
    pub unsafe fn load(
        &mut self,
        segments: Range<usize>,
        gpu_blocks: &[u32],
        slots: &[usize],
        stream: StreamRef,
    ) -> Result<(), TransferError> {
        // Check the whole request once, so a bad id fails before any copy.
        self.plan(gpu_blocks, slots, segments.clone())?;
        for s in segments {
            self.scratch.clear();
            self.layout
                .plan_into(gpu_blocks, slots, s..s + 1, &mut self.scratch)?;
            // SAFETY: as in save(); the caller guarantees the memory.
            unsafe {
                self.backend
                    .copy(&self.scratch, Direction::HostToDevice, stream)?
            };
            if let Some(e) = self.load_events.get(s) {
                e.record(stream)?;
            }
        }
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> Result<(), TransferError> {
        if layer >= self.layout.num_segments() {
            return Err(TransferError::LayerOutOfRange {
                layer,
                segments: self.layout.num_segments(),
            });
        }
        Ok(())
    }

    /// Blocks the host until the last load of `layer` has arrived.
    pub fn wait_layer(&self, layer: usize) -> Result<(), TransferError> {
        self.check_layer(layer)?;
        match self.load_events.get(layer) {
            Some(e) => e.synchronize().map_err(Into::into),
            None => Ok(()),
        }
    }

    /// True once every load queued so far has arrived (all layers); with
    /// `wait`, blocks until then.
    pub fn loads_done(&self, wait: bool) -> Result<bool, TransferError> {
        for e in &self.load_events {
            if wait {
                e.synchronize()?;
            } else if !e.query()? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// True once the last load of `layer` has arrived.
    pub fn layer_ready(&self, layer: usize) -> Result<bool, TransferError> {
        self.check_layer(layer)?;
        match self.load_events.get(layer) {
            Some(e) => e.query().map_err(Into::into),
            None => Ok(true),
        }
    }

    /// Makes `stream` (e.g. the forward pass's) wait on the GPU for `layer`
    /// without blocking the host.
    pub fn stream_wait_layer(&self, layer: usize, stream: StreamRef) -> Result<(), TransferError> {
        self.check_layer(layer)?;
        match self.load_events.get(layer) {
            Some(e) => e.wait_on(stream).map_err(Into::into),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::conformance::{
        pattern, piece_tag, HostMemory, LayoutCase, TestCache, TestMemory,
    };
    use crate::copy::host::HostBackend;

    #[test]
    fn host_transfer_saves_layer_by_layer_and_loads_back() {
        let mut m = HostMemory::default();
        let cache = TestCache::new(&mut m, LayoutCase::SplitKvLeading, 4, 16, 1024);
        cache.fill(&mut m);
        let mut t = KvTransfer::new(cache.layout.clone(), Arc::new(HostBackend), None).unwrap();
        let sb = t.layout().slot_bytes();
        let pool = m.alloc_host(8 * sb);
        let blocks = [3u32, 4, 9];
        let slots = [pool, pool + sb, pool + 5 * sb];
        for l in 0..4 {
            // SAFETY: slots and cache are test memory alive for the test.
            unsafe { t.save(l..l + 1, &blocks, &slots, StreamRef::DEFAULT) }.unwrap();
        }
        assert!(t.save_done(true).unwrap());
        assert_eq!(t.save_event_handle(), Ok(None));
        cache.verify_saved(&blocks, &slots, 0..4, "host transfer save");
        cache.clear(&mut m);
        let dst = [0u32, 1, 15];
        // SAFETY: as above.
        unsafe { t.load(0..4, &dst, &slots, StreamRef::DEFAULT) }.unwrap();
        for l in 0..4 {
            t.wait_layer(l).unwrap();
            assert!(t.layer_ready(l).unwrap());
        }
        cache.verify_loaded(&mut m, &blocks, &dst, "host transfer load");
        assert_eq!(
            t.wait_layer(4),
            Err(TransferError::LayerOutOfRange {
                layer: 4,
                segments: 4
            })
        );
        let _ = (pattern(0, 1), piece_tag(0, 0, 0));
    }

    #[test]
    fn bad_input_fails_before_any_copy() {
        let mut m = HostMemory::default();
        let cache = TestCache::new(&mut m, LayoutCase::Mla, 2, 4, 512);
        let mut t = KvTransfer::new(cache.layout.clone(), Arc::new(HostBackend), None).unwrap();
        let pool = m.alloc_host(4 * t.layout().slot_bytes());
        // SAFETY: rejected before touching memory.
        let r = unsafe { t.load(0..2, &[1, 7], &[pool, pool + 1024], StreamRef::DEFAULT) };
        assert!(matches!(
            r,
            Err(TransferError::Plan(PlanError::BlockOutOfRange {
                block: 7,
                ..
            }))
        ));
        let mut bad = cache.layout.clone();
        bad.piece_bytes = 0;
        assert!(matches!(
            KvTransfer::new(bad, Arc::new(HostBackend), None),
            Err(TransferError::Layout(_))
        ));
    }
}
