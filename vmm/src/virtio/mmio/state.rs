//! A transport's state in a snapshot: its register file and its queues'
//! places in guest memory. Where each queue stands needs no saving: a
//! device is paused between requests and holds no descriptor chain (each
//! one it takes is used at once, or put back), so the driver's and the
//! device's positions both equal the used ring's index, which is in the
//! guest's memory, saved with it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use virtio_queue::QueueT;

use super::MmioTransport;

/// Configuration space bytes compared across a restore: the device's
/// fields all sit in the first ones.
const CONFIG_BYTES: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    /// The configuration space as the guest last could read it.
    pub config: Vec<u8>,
    pub queues: Vec<QueueState>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device {index} of the snapshot is of type {saved}, the VM's is of type {given}")]
    DeviceType {
        index: usize,
        saved: u32,
        given: u32,
    },
    #[error("device {index} of the snapshot has {saved} queues, the VM's has {given}")]
    QueueCount {
        index: usize,
        saved: usize,
        given: usize,
    },
    #[error("device {index}'s queue {queue} cannot be restored: {why}")]
    Queue {
        index: usize,
        queue: usize,
        why: String,
    },
}

impl MmioTransport {
    fn config_bytes(&self) -> Vec<u8> {
        let mut config = vec![0; CONFIG_BYTES];
        self.device.read_config(0, &mut config);
        config
    }

    /// Stops the device's worker (it ends between two requests) and
    /// returns the transport's state. The transport serves no queue after
    /// this: it is for a VMM about to end.
    pub fn pause(&mut self) -> TransportState {
        self.worker = None;
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config: self.config_bytes(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
        }
    }

    /// Takes a saved state (device `index` of the snapshot) over a fresh
    /// transport with its new backend, and brings the device live again
    /// where the driver had it live. The guest's memory is the restored
    /// one already.
    pub fn restore(&mut self, index: usize, state: &TransportState) -> Result<(), StateError> {
        let given = self.device.device_type();
        if state.device_type != given {
            return Err(StateError::DeviceType {
                index,
                saved: state.device_type,
                given,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::QueueCount {
                index,
                saved: state.queues.len(),
                given: self.queues.len(),
            });
        }
        for (queue, (q, saved)) in self.queues.iter_mut().zip(&state.queues).enumerate() {
            let error = |why: String| StateError::Queue { index, queue, why };
            q.try_set_size(saved.size)
                .map_err(|e| error(e.to_string()))?;
            q.try_set_desc_table_address(vm_memory::GuestAddress(saved.desc_table))
                .map_err(|e| error(e.to_string()))?;
            q.try_set_avail_ring_address(vm_memory::GuestAddress(saved.avail_ring))
                .map_err(|e| error(e.to_string()))?;
            q.try_set_used_ring_address(vm_memory::GuestAddress(saved.used_ring))
                .map_err(|e| error(e.to_string()))?;
            q.set_ready(saved.ready);
            if saved.ready {
                if !q.is_valid(&self.memory) {
                    return Err(error("its rings are outside guest memory".into()));
                }
                let used = q
                    .used_idx(&self.memory, Ordering::Acquire)
                    .map_err(|e| error(e.to_string()))?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
            }
        }
        self.status = state.status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.device.restored();
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
        self.interrupt.restore(state.interrupt_status);
        if self.config_bytes() != state.config {
            // A new backend of another size or address: the driver reads
            // its configuration again.
            self.interrupt.signal_config_change();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{writable, Guest, DATA_START};
    use crate::virtio::Interrupt;

    #[test]
    fn a_paused_device_goes_on_in_a_new_transport_from_where_it_stood() {
        let mut g = Guest::new(Box::new(Rng));
        g.activate(0, 1, 16);
        for n in 1..=3u16 {
            g.add_chain(0, &[writable(DATA_START, 32)]);
            g.notify(0);
            assert!(g.wait_used(0, n));
        }
        let state = g.transport.pause();
        assert!(!g.transport.is_active());
        assert_eq!(state.queues.len(), 1);
        assert!(state.queues[0].ready);

        let interrupt = Interrupt::for_test();
        let mut fresh =
            MmioTransport::new(Box::new(Rng), g.memory.clone(), interrupt.clone()).unwrap();
        fresh.restore(0, &state).unwrap();
        assert!(fresh.is_active());
        g.transport = fresh;
        g.interrupt = interrupt;
        // The driver's next request is served, after the three before.
        g.add_chain(0, &[writable(DATA_START, 32)]);
        g.notify(0);
        assert!(g.wait_used(0, 4), "the restored device serves its queue");
    }

    #[test]
    fn a_state_of_another_device_or_shape_is_refused() {
        let mut g = Guest::new(Box::new(Rng));
        g.activate(0, 1, 16);
        let mut state = g.transport.pause();
        let fresh = |g: &Guest| {
            MmioTransport::new(Box::new(Rng), g.memory.clone(), Interrupt::for_test()).unwrap()
        };
        state.device_type = 2;
        assert!(matches!(
            fresh(&g).restore(3, &state),
            Err(StateError::DeviceType { index: 3, .. })
        ));
        state.device_type = 4;
        state.queues.push(state.queues[0].clone());
        assert!(matches!(
            fresh(&g).restore(0, &state),
            Err(StateError::QueueCount { .. })
        ));
        state.queues.truncate(1);
        state.queues[0].used_ring = u64::MAX - 8;
        assert!(matches!(
            fresh(&g).restore(0, &state),
            Err(StateError::Queue { .. })
        ));
    }
}
