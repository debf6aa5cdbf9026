//! `recvmmsg(2)` into buffers with headroom: a relay receives a peer's
//! datagram at an offset so that the framing it sends on (ChannelData header,
//! Data indication) is written in front of the payload instead of copying it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Receive buffers for up to `slots` datagrams per call, each with
/// `headroom` bytes free before and `tailroom` after the payload.
pub struct HeadroomBatch {
    bufs: Vec<Box<[u8]>>,
    headroom: usize,
    max_payload: usize,
    lens: Vec<usize>,
    from: Vec<SocketAddr>,
    filled: usize,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` only ever point into
// buffers this struct owns (boxed, so they do not move with it) and are
// rewritten at the start of every `recv`, which takes `&mut self`; nothing
// is shared, so moving the batch to another thread is sound.
unsafe impl Send for HeadroomBatch {}

impl std::fmt::Debug for HeadroomBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadroomBatch")
            .field("slots", &self.bufs.len())
            .field("filled", &self.filled)
            .finish()
    }
}

impl HeadroomBatch {
    /// Buffers for `slots` datagrams of up to `max_payload` bytes.
    pub fn new(
        slots: usize,
        headroom: usize,
        max_payload: usize,
        tailroom: usize,
    ) -> HeadroomBatch {
        let slots = slots.max(1);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        HeadroomBatch {
            bufs: (0..slots)
                .map(|_| vec![0u8; headroom + max_payload + tailroom].into_boxed_slice())
                .collect(),
            headroom,
            max_payload,
            lens: vec![0; slots],
            from: vec![unspecified; slots],
            filled: 0,
            // SAFETY: all-zero bytes are a valid value of these plain C
            // structs (null pointers and zero lengths).
            names: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: (0..slots)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above.
            hdrs: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Datagrams received by the last call.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Datagram `i`: its whole buffer, where its payload sits, its sender.
    pub fn get_mut(&mut self, i: usize) -> (&mut [u8], Range<usize>, SocketAddr) {
        let range = self.headroom..self.headroom + self.lens[i];
        (&mut self.bufs[i], range, self.from[i])
    }

    /// One non-blocking `recvmmsg` on `fd`; `WouldBlock` when nothing waits.
    /// Datagrams longer than `max_payload` are truncated by the kernel;
    /// their length is reported as received (the caller sees garbage that
    /// fails to frame, never an overrun).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.filled = 0;
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: `headroom < len` by construction; the pointer stays
                // inside the boxed slice, which outlives the call.
                iov_base: unsafe { self.bufs[i].as_mut_ptr().add(self.headroom) }.cast(),
                iov_len: self.max_payload,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by `self` that are
        // not otherwise borrowed during the call; `n` matches their count.
        let got = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for i in 0..got {
            self.lens[i] = (self.hdrs[i].msg_len as usize).min(self.max_payload);
            self.from[i] = sockaddr_to_std(&self.names[i])
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        }
        self.filled = got;
        Ok(got)
    }
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in when the family says so;
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn receives_a_batch_at_the_headroom_offset() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = HeadroomBatch::new(8, 48, 1500, 3);
        assert_eq!(
            batch.recv(rx.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        for i in 0..5u8 {
            tx.send_to(&[i; 10], rx.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(batch.recv(rx.as_fd()).unwrap(), 5);
        for i in 0..5 {
            let (buf, range, from) = batch.get_mut(i);
            assert_eq!(range, 48..58);
            assert_eq!(&buf[range], &[i as u8; 10]);
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }
}
