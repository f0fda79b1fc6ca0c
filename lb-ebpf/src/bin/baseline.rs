//! Benchmark baselines measured in the same run as the balancer: the cheapest possible
//! programs that return `XDP_PASS`, and that swap MACs and return `XDP_TX`; and the new-flow
//! wrapper, which makes every run of a `repeat` test a new flow and tail-calls the program
//! under test (its own cost is measured against `baseline_tx` and subtracted); and the sink
//! `bench lab` puts on the far end of the balancer's veth, which drops (and counts) the
//! benchmark's frames and passes everything else.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Slot 0: the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU flow counter of `bench_new_flow`.
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Added to the counter per run: 1 = a never-seen flow every run, 0 = the same flow every run
/// (the input restored: each run still makes the balancer insert its conntrack entry anew).
#[map]
static BENCH_STEP: Array<u32> = Array::with_max_entries(1, 0);

/// IPv4 source address (as the 4 bytes of the header, read as a native-endian u32) of the
/// frames `bench_sink` drops; 0 = none.
#[map]
static BENCH_SINK_SRC: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU count of the frames `bench_sink` dropped.
#[map]
static BENCH_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Offsets in an untagged IPv4 frame without options: low half of the source address, and the
/// TCP/UDP source port.
const SRC_LOW: usize = 14 + 12 + 2;
const SPORT: usize = 14 + 20;

/// Rewrites the source address's low 16 bits and the source port from a per-CPU counter (so
/// with `BENCH_STEP = 1` each run sees a flow it has never seen; with 0 the input is restored to
/// the same flow), then tail-calls `BENCH_TARGET[0]`.
#[xdp]
pub fn bench_new_flow(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // Bounds check the verifier needs before the two 2-byte writes.
    if start + SPORT + 2 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let (Some(seq), Some(step)) = (BENCH_SEQ.get_ptr_mut(0), BENCH_STEP.get(0)) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the per-CPU slot is valid for this run; both writes were bounds-checked above.
    unsafe {
        let n = (*seq).wrapping_add(*step);
        *seq = n;
        ((start + SRC_LOW) as *mut [u8; 2]).write_unaligned(((n >> 16) as u16).to_be_bytes());
        ((start + SPORT) as *mut [u8; 2]).write_unaligned((n as u16).to_be_bytes());
        BENCH_TARGET.tail_call(&ctx, 0);
    }
    // Only reached when the slot is empty.
    xdp_action::XDP_DROP
}

/// Drops and counts untagged IPv4 frames from `BENCH_SINK_SRC`; passes everything else (so
/// the rest of the lab keeps working while a benchmark floods the link).
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // Bounds check the verifier needs before reading the EtherType and the source address.
    if start + 14 + 20 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let Some(&want) = BENCH_SINK_SRC.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bytes 12..14 and 26..30 were bounds-checked above.
    let (ethertype, src) = unsafe {
        (
            ((start + 12) as *const [u8; 2]).read_unaligned(),
            ((start + 14 + 12) as *const u32).read_unaligned(),
        )
    };
    if ethertype != [0x08, 0x00] || want == 0 || src != want {
        return xdp_action::XDP_PASS;
    }
    if let Some(count) = BENCH_SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: the per-CPU slot is valid for this run.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn baseline_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // Bounds check the verifier needs before touching the 12 MAC bytes.
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let p = start as *mut [u8; 6];
    // SAFETY: both 6-byte fields were bounds-checked above.
    unsafe {
        let dst = *p;
        *p = *p.add(1);
        *p.add(1) = dst;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
