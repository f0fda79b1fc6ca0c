//! `lb decap`: the node side of ipip mode. Nodes' kernels may lack the `ipip`/`ip6_tunnel`
//! modules, so the node runs a small XDP program that strips the outer IPv4/IPv6 header of
//! packets whose inner destination is one of its VIPs and passes the inner packet to its stack.
//! It opens only tunnels whose outer source lies in a configured network (`--source`: the
//! balancers' `[ipip] source_v4` and `source_v6`); others are dropped and counted, so nobody
//! else can inject packets to the VIPs' services with whatever inner source they like.
use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{
        HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Xdp, XdpMode},
};
use lb_common::{DECAP_STAT_COUNT, DecapKey};

use crate::{config::Prefix, dataplane::ip_bytes, objects, signals};

/// Arguments of `lb decap`.
#[derive(clap::Args, Debug, Clone)]
pub struct DecapArgs {
    /// Interface the encapsulated traffic arrives on.
    #[arg(long)]
    pub iface: String,
    /// A VIP this node serves (repeat for several); IPv4 or IPv6.
    #[arg(long = "vip", required = true)]
    pub vips: Vec<IpAddr>,
    /// A network the balancers' encapsulated packets come from (repeat for several): each
    /// balancer's `[ipip] source_v4` (e.g. 172.16.0.0/16) and `source_v6` as a /96 (e.g.
    /// fd00::/96). Tunnels from any other source are dropped.
    #[arg(long = "source", required = true, value_parser = parse_source)]
    pub sources: Vec<Prefix>,
    /// XDP mode: auto (native if the driver supports it), native or generic.
    #[arg(long, default_value = "auto")]
    pub xdp_mode: String,
}

/// The loaded decapsulator.
pub struct Decap {
    ebpf: Ebpf,
    vips: HashMap<MapData, DecapKey, u32>,
    src4: LpmTrie<MapData, [u8; 4], u32>,
    src6: LpmTrie<MapData, [u8; 16], u32>,
    stats: PerCpuArray<MapData, u64>,
}

fn parse_source(s: &str) -> Result<Prefix, String> {
    crate::config::parse_prefix(s).map_err(|e| format!("{e:#}"))
}

impl Decap {
    /// Loads the program (not attached).
    pub fn load() -> Result<Self> {
        let mut ebpf =
            Ebpf::load(objects::get(objects::DECAP, "decap")?).context("loading lb-decap")?;
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_DECAP)
            .context("lb_decap program missing")?
            .try_into()?;
        prog.load().context("loading the lb_decap program")?;
        let vips = HashMap::try_from(
            ebpf.take_map(lb_common::MAP_DECAP_VIPS)
                .context("DECAP_VIPS missing")?,
        )?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map(lb_common::MAP_DECAP_STATS)
                .context("DECAP_STATS missing")?,
        )?;
        let src4 = LpmTrie::try_from(
            ebpf.take_map(lb_common::MAP_DECAP_SRC4)
                .context("DECAP_SRC4 missing")?,
        )?;
        let src6 = LpmTrie::try_from(
            ebpf.take_map(lb_common::MAP_DECAP_SRC6)
                .context("DECAP_SRC6 missing")?,
        )?;
        Ok(Self {
            ebpf,
            vips,
            src4,
            src6,
            stats,
        })
    }

    /// Accepts encapsulated packets whose outer source lies in `net`.
    pub fn add_source(&mut self, net: Prefix) -> Result<()> {
        let len = u32::from(net.len);
        let r = match net.addr {
            IpAddr::V4(a) => self.src4.insert(&Key::new(len, a.octets()), 1, 0),
            IpAddr::V6(a) => self.src6.insert(&Key::new(len, a.octets()), 1, 0),
        };
        r.with_context(|| format!("adding decap source {net}"))
    }

    /// Accepts encapsulated packets for `vip`.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<()> {
        let (addr, family) = ip_bytes(vip);
        let key = DecapKey {
            addr,
            family,
            _pad: [0; 3],
        };
        self.vips
            .insert(key, 1, 0)
            .with_context(|| format!("adding decap VIP {vip}"))
    }

    /// The program (attach, or `BPF_PROG_TEST_RUN`).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(lb_common::PROG_DECAP)
            .context("lb_decap program missing")?
            .try_into()?)
    }

    /// Decap counters summed over CPUs, indexed by `DecapStat`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..DECAP_STAT_COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// Runs `lb decap` until SIGTERM/SIGINT; the program is detached on exit.
pub fn run(args: DecapArgs) -> Result<()> {
    let mut d = Decap::load()?;
    for v in &args.vips {
        d.add_vip(*v)?;
    }
    for s in &args.sources {
        d.add_source(*s)?;
    }
    let setting = crate::config::parse_xdp_mode(&args.xdp_mode)?;
    let iface = args.iface.clone();
    let prog = d.program_mut()?;
    let mode = match setting {
        crate::config::XdpModeSetting::Native => {
            prog.attach(&iface, XdpMode::Driver)?;
            "native"
        }
        crate::config::XdpModeSetting::Generic => {
            prog.attach(&iface, XdpMode::Skb)?;
            "generic"
        }
        crate::config::XdpModeSetting::Auto => {
            if prog.attach(&iface, XdpMode::Driver).is_ok() {
                "native"
            } else {
                prog.attach(&iface, XdpMode::Skb)
                    .with_context(|| format!("attaching lb_decap to {iface}"))?;
                "generic"
            }
        }
    };
    if args.vips.is_empty() {
        bail!("no --vip given");
    }
    let sources: Vec<String> = args.sources.iter().map(|s| s.to_string()).collect();
    println!(
        "lb decap: attached to {iface} in {mode} XDP mode, accepting tunnels from {}; ready",
        sources.join(", ")
    );
    signals::install();
    while !signals::stop_requested() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let c = d.counters()?;
    println!(
        "lb decap: exiting (decapsulated {}, not ours {}, malformed {}, passed {}, foreign source {})",
        c[0], c[1], c[2], c[3], c[4]
    );
    Ok(())
}
