//! A home network behind NAT, built from network namespaces the test creates (root and
//! iptables needed): `home` (10.213.1.2) reaches `inet` (10.213.2.2) through a masquerading
//! router; nothing in `inet` can open a connection to `home`. Everything is removed on drop;
//! the machine's own namespace is never touched.

use std::process::Command;

pub const HOME_IP: &str = "10.213.1.2";
pub const INET_IP: &str = "10.213.2.2";

#[derive(Debug)]
pub struct NatLab {
    prefix: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NatLab {
    /// Builds the namespaces, or says why it cannot (not root, no `ip` or `iptables`).
    pub fn create() -> Result<NatLab, String> {
        let lab = NatLab {
            prefix: format!("hd{}", std::process::id() % 100_000),
        };
        let p = &lab.prefix;
        let (r, h, i) = (format!("{p}r"), format!("{p}h"), format!("{p}i"));
        for ns in [&r, &h, &i] {
            sh(&["ip", "netns", "add", ns])?;
        }
        let link = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            sh(&[
                "ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns",
                b_ns,
            ])
        };
        let (rh, hh, ri, ii) = (
            format!("{p}rh"),
            format!("{p}hh"),
            format!("{p}ri"),
            format!("{p}ii"),
        );
        link(&rh, &r, &hh, &h)?;
        link(&ri, &r, &ii, &i)?;
        for (ns, dev, cidr) in [
            (&r, &rh, "10.213.1.1/24"),
            (&r, &ri, "10.213.2.1/24"),
            (&h, &hh, "10.213.1.2/24"),
            (&i, &ii, "10.213.2.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip",
            "-n",
            &h,
            "route",
            "add",
            "default",
            "via",
            "10.213.1.1",
        ])?;
        sh(&[
            "ip",
            "-n",
            &i,
            "route",
            "add",
            "default",
            "via",
            "10.213.2.1",
        ])?;
        let in_router = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &r];
            all.extend_from_slice(args);
            sh(&all)
        };
        in_router(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        in_router(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &ri,
            "-j",
            "MASQUERADE",
        ])?;
        in_router(&[
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            &ri,
            "-o",
            &rh,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ])?;
        in_router(&[
            "iptables", "-A", "FORWARD", "-i", &ri, "-o", &rh, "-j", "DROP",
        ])?;
        Ok(lab)
    }

    /// A command that runs `program` inside the home network (behind the NAT).
    pub fn home(&self, program: &std::path::Path) -> Command {
        self.exec(&format!("{}h", self.prefix), program)
    }

    /// A command that runs `program` on the "internet" side.
    pub fn inet(&self, program: &std::path::Path) -> Command {
        self.exec(&format!("{}i", self.prefix), program)
    }

    fn exec(&self, ns: &str, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for n in ["r", "h", "i"] {
            let _ = sh(&["ip", "netns", "del", &format!("{}{n}", self.prefix)]);
        }
    }
}
