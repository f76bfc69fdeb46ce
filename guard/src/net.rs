//! Socket addresses as guard compares them.

use std::net::{IpAddr, SocketAddr};

/// `::ffff:a.b.c.d` as the IPv4 address it is.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}
