//! Parsing of `/proc/self/mountinfo` (proc(5)), the kernel's view of the mount table.
//!
//! Owns the [`MountEntry`] type and the pure [`parse`] function. Parsing never touches the
//! machine and never panics: any input yields either entries or a [`ParseError`] naming the
//! line. Octal escapes the kernel writes for space, tab, newline and backslash (`\040`, `\011`,
//! `\012`, `\134`) are decoded; paths are kept as raw bytes, so non-UTF-8 names survive.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// Device number of the filesystem (`st_dev`), major part.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that forms the root of this mount (for a bind mount of
    /// `/a/b`, `/a/b` relative to its filesystem's root).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, `relatime`, ...).
    pub mount_options: String,
    pub fs_type: String,
    /// Filesystem-specific source (`/dev/loop3`, `tmpfs`, `none`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// Whether the mount itself is read-only (`ro` among the per-mount options).
    pub fn is_read_only(&self) -> bool {
        self.has_mount_option("ro")
    }

    /// Whether `name` is one of the per-mount options (exact match, e.g. `nosuid`).
    pub fn has_mount_option(&self, name: &str) -> bool {
        self.mount_options.split(',').any(|o| o == name)
    }

    /// Whether `name` is one of the superblock options, or `name=value` when it takes a value.
    pub fn super_option(&self, name: &str) -> Option<&str> {
        self.super_options.split(',').find_map(|o| match o.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if o == name => Some(""),
            _ => None,
        })
    }
}

/// A line of mountinfo did not have the documented shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    pub reason: String,
}

/// Parses the whole text of a mountinfo file. Empty lines are skipped.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l).map_err(|reason| ParseError { line: i + 1, reason }))
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, String> {
    // Fields are separated by single spaces; an empty source shows up as an empty field.
    let mut fields = line.split(' ');
    let mut next = |what: &str| fields.next().ok_or_else(|| format!("missing {what}"));

    let mount_id = parse_u32(next("mount id")?, "mount id")?;
    let parent_id = parse_u32(next("parent id")?, "parent id")?;
    let dev = next("major:minor")?;
    let (major, minor) = dev
        .split_once(':')
        .ok_or_else(|| format!("device {dev:?} is not major:minor"))?;
    let major = parse_u32(major, "major")?;
    let minor = parse_u32(minor, "minor")?;
    let root = PathBuf::from(OsString::from_vec(unescape(next("root")?)));
    let mount_point = PathBuf::from(OsString::from_vec(unescape(next("mount point")?)));
    let mount_options = next("mount options")?.to_owned();
    // Zero or more optional fields ("shared:1", "master:2", ...) end with a lone "-".
    loop {
        if next("separator \"-\"")? == "-" {
            break;
        }
    }
    let fs_type = lossy(next("filesystem type")?);
    let source = lossy(next("mount source")?);
    let super_options = lossy(next("super options")?);
    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

fn parse_u32(s: &str, what: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("{what} {s:?} is not a number"))
}

fn lossy(s: &str) -> String {
    String::from_utf8_lossy(&unescape(s)).into_owned()
}

/// Decodes `\ooo` octal escapes; a backslash not followed by three octal digits stays as is.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                // Three octal digits can reach 0o777; only byte values are real escapes.
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;
    use std::path::Path;

    const REAL: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
45 28 0:40 / /tmp rw,nosuid,nodev shared:22 master:3 - tmpfs tmpfs rw,size=1048576k,inode64
301 28 7:3 / /var/lib/berth/pools/fast rw,relatime - btrfs /dev/loop3 rw,space_cache=v2,subvolid=5,subvol=/
302 45 7:3 /vol\\0401 /tmp/my\\040dir ro,nosuid,nodev,relatime - btrfs /dev/loop3 rw,subvolid=256,subvol=/vol 1
303 28 0:5 /loop7 /var/lib/kubelet/pods/x/volumeDevices/pv rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4k
";

    #[test]
    fn parses_real_lines() {
        let entries = parse(REAL).unwrap();
        assert_eq!(entries.len(), 6);

        let sys = &entries[0];
        assert_eq!((sys.mount_id, sys.parent_id), (22, 28));
        assert_eq!((sys.major, sys.minor), (0, 21));
        assert_eq!(sys.fs_type, "sysfs");
        assert!(sys.has_mount_option("noexec"));
        assert!(!sys.is_read_only());

        let tmp = &entries[2];
        assert_eq!(tmp.fs_type, "tmpfs");
        assert_eq!(tmp.super_option("size"), Some("1048576k"));
        assert_eq!(tmp.super_option("inode64"), Some(""));
        assert_eq!(tmp.super_option("mode"), None);

        let bind = &entries[4];
        assert_eq!(bind.root, Path::new("/vol 1"));
        assert_eq!(bind.mount_point, Path::new("/tmp/my dir"));
        assert!(bind.is_read_only());
        assert_eq!(bind.source, "/dev/loop3");
        assert_eq!(bind.super_options, "rw,subvolid=256,subvol=/vol");
        assert_eq!((bind.major, bind.minor), (7, 3));
    }

    #[test]
    fn empty_source_is_an_empty_field() {
        let e = parse("50 28 0:50 / /mnt rw - fuse  rw,user_id=0\n").unwrap();
        assert_eq!(e[0].source, "");
        assert_eq!(e[0].super_options, "rw,user_id=0");
    }

    #[rstest]
    #[case::tab("a\\011b", b"a\tb".to_vec())]
    #[case::newline("a\\012b", b"a\nb".to_vec())]
    #[case::backslash("a\\134b", b"a\\b".to_vec())]
    #[case::short("a\\04", b"a\\04".to_vec())]
    #[case::not_octal("a\\089", b"a\\089".to_vec())]
    #[case::too_big("\\777", b"\\777".to_vec())]
    #[case::trailing("x\\", b"x\\".to_vec())]
    #[case::non_utf8("\\377", vec![0xff])]
    fn unescapes(#[case] input: &str, #[case] expected: Vec<u8>) {
        assert_eq!(unescape(input), expected);
    }

    #[rstest]
    #[case::no_separator("22 28 0:21 / /sys rw shared:7 sysfs sysfs rw", "separator")]
    #[case::bad_dev("22 28 021 / /sys rw - sysfs sysfs rw", "major:minor")]
    #[case::bad_id("x 28 0:21 / /sys rw - sysfs sysfs rw", "mount id")]
    #[case::truncated("22 28 0:21 / /sys rw - sysfs", "mount source")]
    fn rejects_malformed(#[case] line: &str, #[case] reason: &str) {
        let err = parse(&format!("28 1 259:2 / / rw - ext4 /dev/x rw\n{line}\n")).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.contains(reason), "{err}");
    }

    #[test]
    fn parses_this_process_mountinfo() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let entries = parse(&text).unwrap();
        assert!(entries.iter().any(|e| e.mount_point == Path::new("/")));
    }

    proptest! {
        #[test]
        fn never_panics(text in any::<String>()) {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_near_miss(text in "([0-9]{1,3}[ :\\-\\\\/a-z]{0,3}){0,30}(\n|)") {
            let _ = parse(&text);
        }

        #[test]
        fn round_trips_escaped_paths(name in "[ \\ta-z\\\\\n]{1,20}") {
            let escaped: String = name.chars().map(|c| match c {
                ' ' => "\\040".to_owned(),
                '\t' => "\\011".to_owned(),
                '\n' => "\\012".to_owned(),
                '\\' => "\\134".to_owned(),
                c => c.to_string(),
            }).collect();
            let line = format!("1 2 3:4 / /mnt/{escaped} rw - tmpfs tmpfs rw");
            let e = parse(&line).unwrap();
            prop_assert_eq!(e[0].mount_point.clone(), PathBuf::from(format!("/mnt/{name}")));
        }
    }
}
