//! The network lock while CRIU dumps a VPS: the bridge stops passing frames
//! to and from the host end of its veth (the port's state goes to
//! `disabled`), so nothing reaches the frozen tasks' sockets and nothing
//! leaves them (a packet processed mid-dump would make the dumped TCP state
//! disagree with the peer's). Unlocking puts the port back to `forwarding`
//! and the link up (a held restore's link waits down until it may run).
//! Each is one ioctl or one netlink request, fast enough to run inside
//! CRIU's notifications.
//!
//! The link itself stays up while locked: with the host end down, the VPS's
//! eth0 loses its carrier and the kernel marks its routes `linkdown`; an
//! unprivileged VPS's routes are dumped with its netns, and `ip route
//! restore` refuses routes carrying that flag.
//!
//! Why not CRIU's own nftables lock: CRIU records the lock method in the
//! images, and every restore then deletes the dump's table in the VPS's new
//! netns, where it never existed. The kernel takes a failed nftables
//! transaction back with an RCU grace period: 10-25 ms inside the restore's
//! frozen window, on every migration.
//!
//! Loopback traffic between the VPS's own frozen tasks is not blocked; only
//! a timer could move it then (a delayed ACK, which TCP's sequence numbers
//! make harmless either way).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Locks (`up` false) or unlocks the VPS's host link `name` (in this
/// process's netns): see the module doc. Unlocking a link that no longer
/// exists succeeds.
pub fn set_link(name: &str, up: bool) -> std::io::Result<()> {
    if up {
        set_admin_up(name, true)?;
        match set_port_state(name, true) {
            Ok(()) => Ok(()),
            // Gone, on no bridge, or no carrier yet (the bridge then turns
            // the port to forwarding itself once the carrier comes).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENODEV)
                        | Some(libc::EINVAL)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::ENETDOWN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    } else {
        set_port_state(name, false)
    }
}

/// Bridge port states (linux/if_bridge.h).
const BR_STATE_DISABLED: u8 = 0;
const BR_STATE_FORWARDING: u8 = 3;
const IFLA_PROTINFO: u16 = 12;
const IFLA_BRPORT_STATE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// Sets the bridge port `name` forwarding, or disabled (the bridge passes no
/// frame to or from it), with one RTM_SETLINK request.
fn set_port_state(name: &str, forwarding: bool) -> std::io::Result<()> {
    let index = if_index(name)?;
    let state = if forwarding {
        BR_STATE_FORWARDING
    } else {
        BR_STATE_DISABLED
    };
    let mut msg = Vec::with_capacity(44);
    // nlmsghdr: length (filled below), type, flags, seq, pid.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_BRIDGE as u8, 0]);
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&index.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // IFLA_PROTINFO { IFLA_BRPORT_STATE: u8 } (the inner attribute padded to 4).
    msg.extend_from_slice(&12u16.to_ne_bytes());
    msg.extend_from_slice(&(IFLA_PROTINFO | NLA_F_NESTED).to_ne_bytes());
    msg.extend_from_slice(&5u16.to_ne_bytes());
    msg.extend_from_slice(&IFLA_BRPORT_STATE.to_ne_bytes());
    msg.extend_from_slice(&[state, 0, 0, 0]);
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());

    // SAFETY: socket() takes plain integers and returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: send(2) of a buffer we own, its length given.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: recv(2) into a buffer we own, its length given.
    let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The answer: nlmsghdr (16 bytes) of type NLMSG_ERROR, then its errno (0: done).
    let got = got as usize;
    if got < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(std::io::Error::other(
            "unexpected netlink answer setting a bridge port's state",
        ));
    }
    let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(-err));
    }
    Ok(())
}

fn if_index(name: &str) -> std::io::Result<i32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a link name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i as i32)
}

/// Takes the link `name` administratively up or down.
fn set_admin_up(name: &str, up: bool) -> std::io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // SAFETY: socket() takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data (a name and a union of integers and
    // pointers); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags of the
    // ifreq we own; the name is NUL-terminated (shorter than IFNAMSIZ).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        let e = std::io::Error::last_os_error();
        // A link that is gone locks nothing.
        if up && e.raw_os_error() == Some(libc::ENODEV) {
            return Ok(());
        }
        return Err(e);
    }
    // SAFETY: SIOCGIFFLAGS just filled ifru_flags, the union's active field.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let iff_up = libc::IFF_UP as libc::c_short;
    let want = if up { flags | iff_up } else { flags & !iff_up };
    if want == flags {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = want;
    // SAFETY: SIOCSIFFLAGS reads the name and ifru_flags of our ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_be_a_link_name() {
        assert!(set_link("", false).is_err());
        assert!(set_link("a-name-longer-than-ifnamsiz", false).is_err());
    }

    #[test]
    fn a_missing_link_is_not_locked() {
        assert!(set_link("ferrynolink0", true).is_ok());
        assert!(set_link("ferrynolink0", false).is_err());
    }
}
