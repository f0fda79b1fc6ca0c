//! Benchmark baselines measured in the same run as the balancer: the cheapest possible
//! programs that return `XDP_PASS`, and that swap MACs and return `XDP_TX`.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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
