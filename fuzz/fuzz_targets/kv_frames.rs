//! The KV data plane's receiver on arbitrary bytes: each input is sent, after a valid
//! handshake, down a fresh connection to a real `KvReceiver` whose sink lends slots of two
//! leases; then the sender closes and waits for the receiver to close too. The receiver must
//! neither crash, nor hang, nor write outside the slots it was given.
#![no_main]

use kv_store::tcp::{ConnId, KvReceiver, KvSender, SlabSink, Slot};
use libfuzzer_sys::fuzz_target;
use protocol::LeaseId;
use std::io::{Read, Write};
use std::sync::{Mutex, OnceLock};

const SLAB: usize = 64;
const BLOCKS: usize = 4;
const LAYERS: usize = 2;

/// Two leases' memory: ids 0x01… and 0x02…, `BLOCKS` blocks × `LAYERS` layers each.
struct Sink(Mutex<Vec<u8>>);

unsafe impl SlabSink for Sink {
    fn slots(
        &self,
        _conn: ConnId,
        lease: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut m = self.0.lock().unwrap();
        let which = match lease.0 {
            [1, ..] => 0,
            [2, ..] => 1,
            _ => return,
        };
        for &b in blocks {
            let ok = len == SLAB && (b as usize) < BLOCKS && (layer as usize) < LAYERS;
            out.push(ok.then(|| {
                let at = ((which * LAYERS + layer as usize) * BLOCKS + b as usize) * SLAB;
                Slot {
                    ptr: m[at..at + SLAB].as_mut_ptr(),
                    len,
                }
            }));
        }
    }
    fn end(&self, _: ConnId, _: LeaseId, _: u32, _: u64) {}
    fn abort(&self, _: ConnId, _: LeaseId) {}
}

fn receiver() -> &'static KvReceiver {
    static R: OnceLock<KvReceiver> = OnceLock::new();
    R.get_or_init(|| {
        let sink = Sink(Mutex::new(vec![0; 2 * LAYERS * BLOCKS * SLAB]));
        KvReceiver::bind(
            "127.0.0.1:0",
            std::sync::Arc::new(sink),
            None,
            Default::default(),
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let addr = receiver().local_addr().to_string();
    let mut s = KvSender::connect(&addr, None).unwrap().into_stream();
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // The receiver closes once it has read (or refused) everything.
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut sink = [0u8; 64];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            // libFuzzer's own timers interrupt system calls.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the receiver hung: {e}"),
        }
    }
});
