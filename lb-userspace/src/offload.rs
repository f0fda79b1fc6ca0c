//! An interface's offload switches, through the legacy ethtool ioctls (`SIOCETHTOOL`), so no
//! `ethtool` binary is needed. The daemon turns receive aggregation off on an interface it
//! attaches in generic XDP mode (docs/dataplane.md "Generic XDP and aggregated frames"); the
//! tests also switch transmit offloads.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Result, bail};

/// One switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Generic receive offload (software aggregation; also gates hardware GRO).
    Gro,
    /// Large receive offload (aggregation in the NIC, or a virtio host's).
    Lro,
    /// TCP segmentation offload.
    Tso,
    /// Transmit checksum offload.
    TxCsum,
    /// Scatter-gather.
    Sg,
}

impl Feature {
    /// The name `ethtool -k` prints.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Gro => "generic-receive-offload",
            Feature::Lro => "large-receive-offload",
            Feature::Tso => "tcp-segmentation-offload",
            Feature::TxCsum => "tx-checksumming",
            Feature::Sg => "scatter-gather",
        }
    }

    /// The switch named `s` (as [`Feature::name`] prints it).
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Feature::Gro,
            Feature::Lro,
            Feature::Tso,
            Feature::TxCsum,
            Feature::Sg,
        ]
        .into_iter()
        .find(|f| f.name() == s)
    }

    /// (get, set) commands; LRO is a bit of the flags word instead.
    fn cmds(self) -> (u32, u32) {
        match self {
            Feature::TxCsum => (0x16, 0x17),
            Feature::Sg => (0x18, 0x19),
            Feature::Tso => (0x1e, 0x1f),
            Feature::Gro => (0x2b, 0x2c),
            Feature::Lro => (ETHTOOL_GFLAGS, ETHTOOL_SFLAGS),
        }
    }
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETH_FLAG_LRO: u32 = 1 << 15;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct Ifreq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn socket() -> Result<OwnedFd> {
    // SAFETY: a plain datagram socket; the descriptor is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(sock: &OwnedFd, ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {ifname:?}: 1 to {} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    let mut v = EthtoolValue { cmd, data };
    let mut ifr = Ifreq {
        name: [0; libc::IFNAMSIZ],
        data: &mut v,
        _pad: [0; 16],
    };
    for (d, s) in ifr.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live ethtool_value.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) };
    if rc != 0 {
        bail!(
            "ethtool ioctl {cmd:#x} on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(v.data)
}

/// Whether `f` is on for `ifname` (in the calling thread's network namespace).
pub fn get(ifname: &str, f: Feature) -> Result<bool> {
    let sock = socket()?;
    let v = ioctl(&sock, ifname, f.cmds().0, 0)?;
    Ok(match f {
        Feature::Lro => v & ETH_FLAG_LRO != 0,
        _ => v != 0,
    })
}

/// Turns `f` on or off for `ifname`, then reads it back (a driver may refuse silently).
pub fn set(ifname: &str, f: Feature, on: bool) -> Result<()> {
    let sock = socket()?;
    let (g, s) = f.cmds();
    let value = match f {
        Feature::Lro => {
            let flags = ioctl(&sock, ifname, g, 0)?;
            if on {
                flags | ETH_FLAG_LRO
            } else {
                flags & !ETH_FLAG_LRO
            }
        }
        _ => u32::from(on),
    };
    ioctl(&sock, ifname, s, value)?;
    if get(ifname, f)? != on {
        bail!(
            "{ifname}: {} stays {} (the driver does not let it change)",
            f.name(),
            if on { "off" } else { "on" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in [
            Feature::Gro,
            Feature::Lro,
            Feature::Tso,
            Feature::TxCsum,
            Feature::Sg,
        ] {
            assert_eq!(Feature::from_name(f.name()), Some(f));
        }
        assert_eq!(Feature::from_name("gro"), None);
    }

    #[test]
    fn a_missing_interface_is_an_error_naming_it() {
        let e = format!("{:#}", get("lbnosuchif0", Feature::Gro).unwrap_err());
        assert!(e.contains("lbnosuchif0"), "{e}");
        assert!(get("", Feature::Gro).is_err());
    }
}
