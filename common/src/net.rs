//! Which network addresses a tenant's endpoints may reach — HTTP sources,
//! S3 endpoints and embedding servers alike. By default only public
//! unicast addresses: a resource must not become a way into the cluster's
//! own network (metadata services, databases, the Kubernetes API). A
//! resource may allow private networks only where the installation permits
//! it (`--allow-private-networks` on the operator and the workers).

use std::net::{IpAddr, Ipv4Addr};

/// Why an address was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to connect to {addr} ({host}): it is a {kind} address and the resource does not set allowPrivateNetworks"
)]
pub struct AddressRefused {
    pub host: String,
    pub addr: IpAddr,
    pub kind: &'static str,
}

/// `None` for a public unicast address, else what kind of address it is.
pub fn non_public_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_kind(v4);
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg0 & 0xfe00 == 0xfc00 {
                Some("unique local (private)")
            } else if seg0 & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg0 == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("documentation")
            } else if seg0 == 0x0064 && v6.segments()[1] == 0xff9b {
                // NAT64 can reach any IPv4 address, private ones included.
                Some("NAT64")
            } else {
                None
            }
        }
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("broadcast/multicast/reserved")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("carrier-grade NAT (shared)")
    } else if o[0] == 198 && (o[1] == 18 || o[1] == 19) {
        Some("benchmarking")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

/// Checks one address against the policy.
pub fn check(host: &str, addr: IpAddr, allow_private: bool) -> Result<(), AddressRefused> {
    match non_public_kind(addr) {
        Some(kind) if !allow_private => Err(AddressRefused {
            host: host.to_string(),
            addr,
            kind,
        }),
        _ => Ok(()),
    }
}

/// Refuses a URL whose host is an IP literal outside the policy (a
/// resolver never sees those).
pub fn check_url(url: &url::Url, allow_private: bool) -> Result<(), AddressRefused> {
    match url.host() {
        Some(url::Host::Ipv4(v4)) => check(&v4.to_string(), IpAddr::V4(v4), allow_private),
        Some(url::Host::Ipv6(v6)) => check(&v6.to_string(), IpAddr::V6(v6), allow_private),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "255.255.255.255",
            "224.0.0.1",
        ];
        for a in refused {
            let ip: IpAddr = a.parse().expect("fixture address");
            assert!(non_public_kind(ip).is_some(), "{a} should be refused");
            assert!(check("h", ip, false).is_err());
            assert!(check("h", ip, true).is_ok());
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            let ip: IpAddr = a.parse().expect("fixture address");
            assert_eq!(non_public_kind(ip), None, "{a} is public");
        }
    }

    #[test]
    fn literal_hosts_are_checked() {
        let u = url::Url::parse("http://169.254.169.254/latest/meta-data").expect("url");
        let e = check_url(&u, false).expect_err("metadata service must be refused");
        assert!(e.to_string().contains("link-local"), "{e}");
        let u = url::Url::parse("http://[::1]:8080/x").expect("url");
        assert!(check_url(&u, false).is_err());
        assert!(check_url(&u, true).is_ok());
    }
}
