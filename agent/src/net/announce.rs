//! Gratuitous ARP: when a VPS starts running on a node it was not on a moment
//! ago (a migration's target, or its source after a rollback), it announces
//! its address from its own `eth0`. Every bridge and switch on the LAN learns
//! the MAC's new port at once, and every neighbour's ARP entry is refreshed,
//! instead of frames going to the old port until some reply of the VPS's
//! happens to teach them.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{AgentError, Result};

const ETH_P_ARP: u16 = 0x0806;
/// Announcements sent, this far apart (a lost first one is common while the
/// LAN's bridges still point at the old port).
const REPEATS: usize = 3;
const GAP: Duration = Duration::from_millis(100);

/// The two classic forms of a gratuitous ARP for `ip` at `mac` (a request and
/// a reply, both with sender = target = `ip`), as Ethernet frames.
pub fn garp_frames(ip: Ipv4Addr, mac: [u8; 6]) -> [[u8; 42]; 2] {
    let frame = |op: u8| {
        let mut f = [0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        f[18] = 6;
        f[19] = 4;
        f[20..22].copy_from_slice(&(op as u16).to_be_bytes());
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&ip.octets());
        // Target MAC: zero in a request, broadcast in a reply (RFC 5227).
        if op == 2 {
            f[32..38].copy_from_slice(&[0xff; 6]);
        }
        f[38..42].copy_from_slice(&ip.octets());
        f
    };
    [frame(1), frame(2)]
}

/// Announces `ip` from `eth0` in the netns at `netns`, in the background
/// (a thread of its own joins the netns, so no runtime thread changes
/// namespace). Failures are logged: the VPS runs either way.
pub fn announce(netns: &Path, ip: Ipv4Addr, mac: [u8; 6], vps: &str) {
    let (netns, vps) = (netns.to_path_buf(), vps.to_string());
    std::thread::spawn(move || {
        if let Err(e) = send_garps(&netns, ip, mac) {
            tracing::warn!(vps = %vps, error = %e, "gratuitous ARP not sent");
        }
    });
}

fn send_garps(netns: &PathBuf, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
    let ns = std::fs::File::open(netns)
        .map_err(|e| AgentError::io(format!("opening netns {}", netns.display()), e))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let ifindex = nix::net::if_::if_nametoindex("eth0")?;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            ETH_P_ARP.to_be() as i32,
        )
    };
    if raw < 0 {
        return Err(AgentError::io(
            "opening a packet socket",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a fresh descriptor this function owns alone.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for round in 0..REPEATS {
        if round > 0 {
            std::thread::sleep(GAP);
        }
        for f in garp_frames(ip, mac) {
            // SAFETY: the buffer and address outlive the call and their sizes
            // are passed with them.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                return Err(AgentError::io(
                    "sending a gratuitous ARP",
                    std::io::Error::last_os_error(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_announce_the_address_from_the_mac() {
        let mac = [0x02, 0xfe, 1, 2, 3, 4];
        let [req, rep] = garp_frames(Ipv4Addr::new(10, 0, 0, 7), mac);
        for f in [&req, &rep] {
            assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
            assert_eq!(&f[6..12], &mac);
            assert_eq!(&f[12..14], &[0x08, 0x06]);
            assert_eq!(&f[22..28], &mac, "sender MAC");
            assert_eq!(&f[28..32], &[10, 0, 0, 7], "sender IP");
            assert_eq!(&f[38..42], &[10, 0, 0, 7], "target IP = sender IP");
        }
        assert_eq!((req[21], rep[21]), (1, 2));
        assert_eq!(&req[32..38], &[0; 6]);
    }
}
