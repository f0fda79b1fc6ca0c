//! Benchmark baselines measured in the same run as the balancer: the cheapest possible
//! programs that return `XDP_PASS`, and that swap MACs and return `XDP_TX`; and the new-flow
//! wrapper, which restores each run's input (and can make every run of a `repeat` test a new
//! flow) and tail-calls the program under test (its own cost is measured against `baseline_tx`
//! and subtracted); and the sink
//! `bench lab` puts on the far end of the balancer's veth, which drops (and counts) the
//! benchmark's frames and passes everything else.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Slot 0: the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU flow counter of `bench_wrapper`.
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `bench_wrapper`'s settings (slot 0) as `u32` words, indexed by the `CFG_*` constants. The
/// bench writes them; the same settings serve the balancer run and the wrapper's own-cost run.
#[map]
static BENCH_CFG: Array<[u32; 8]> = Array::with_max_entries(1, 0);

/// IPv4 source address (as the 4 bytes of the header, read as a native-endian u32) of the
/// frames `bench_sink` drops; 0 = none.
#[map]
static BENCH_SINK_SRC: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU count of the frames `bench_sink` dropped.
#[map]
static BENCH_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Added to the counter per run: 1 = a never-seen flow every run, 0 = the same flow.
const CFG_STEP: usize = 0;
/// 1: the counter goes into the IPv4 source address's low half and the source port.
const CFG_REWRITE_SRC: usize = 1;
/// Non-zero: the IPv4 destination's low half becomes `counter % this` (traffic spread over
/// that many VIPs, configured at consecutive addresses from the packet's own).
const CFG_VIPS: usize = 2;
/// Non-zero: the input frame's length. A frame the last run grew (encapsulated) is cut back to
/// it, and every frame gets the input's Ethernet header back (`CFG_ETH`).
const CFG_RESTORE_LEN: usize = 3;
/// Words 4..8: the input's Ethernet header (its first 14 bytes).
const CFG_ETH: usize = 4;

/// Offsets in an untagged IPv4 frame without options: low halves of the source and
/// destination addresses, and the TCP/UDP source port.
const SRC_LOW: usize = 14 + 12 + 2;
const DST_LOW: usize = 14 + 16 + 2;
const SPORT: usize = 14 + 20;

/// Turns the previous run's output back into an input (see `CFG_RESTORE_LEN`), rewrites the
/// flow from a per-CPU counter as `BENCH_CFG` says, then tail-calls `BENCH_TARGET[0]`. With
/// `repeat > 1` the kernel feeds each run's output to the next run, so without this a rewriting
/// program would measure its own output.
#[xdp]
pub fn bench_wrapper(ctx: XdpContext) -> u32 {
    let Some(cfg) = BENCH_CFG.get(0) else {
        return xdp_action::XDP_DROP;
    };
    if cfg[CFG_RESTORE_LEN] != 0 {
        let grown = (ctx.data_end() - ctx.data()) as i32 - cfg[CFG_RESTORE_LEN] as i32;
        // SAFETY: a plain helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, grown) } != 0 {
            return xdp_action::XDP_DROP;
        }
        let start = ctx.data();
        // Bounds check the verifier needs before the 14-byte write.
        if start + 14 > ctx.data_end() {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: 14 bytes bounds-checked above; the source is the map value's 16 bytes.
        unsafe {
            let eth = (cfg.as_ptr().add(CFG_ETH) as *const [u8; 14]).read_unaligned();
            (start as *mut [u8; 14]).write_unaligned(eth);
        }
    }
    let start = ctx.data();
    // Bounds check the verifier needs before the three 2-byte writes.
    if start + SPORT + 2 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the per-CPU slot is valid for this run; every write was bounds-checked above.
    unsafe {
        let n = (*seq).wrapping_add(cfg[CFG_STEP]);
        *seq = n;
        if cfg[CFG_REWRITE_SRC] != 0 {
            ((start + SRC_LOW) as *mut [u8; 2]).write_unaligned(((n >> 16) as u16).to_be_bytes());
            ((start + SPORT) as *mut [u8; 2]).write_unaligned((n as u16).to_be_bytes());
        }
        if cfg[CFG_VIPS] != 0 {
            let vip = (n % cfg[CFG_VIPS]) as u16;
            ((start + DST_LOW) as *mut [u8; 2]).write_unaligned(vip.to_be_bytes());
        }
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
