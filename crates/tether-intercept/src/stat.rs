//! The target's file metadata (`FileStat`, portable units) as Linux's `struct stat` and
//! `struct statx`, for every interceptor that answers a stat call.

use tether_protocol::FileStat;

fn split_ns(ns: i64) -> (i64, i64) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Fills `st` (all-zero or not: every field the kernel sets is written).
pub fn fill_stat(stat: &FileStat, st: &mut libc::stat) {
    st.st_dev = stat.dev;
    st.st_ino = stat.ino;
    st.st_nlink = stat.nlink as _;
    st.st_mode = stat.mode;
    st.st_uid = stat.uid;
    st.st_gid = stat.gid;
    st.st_rdev = stat.rdev;
    st.st_size = stat.size as i64;
    st.st_blksize = stat.blksize as _;
    st.st_blocks = stat.blocks as i64;
    (st.st_atime, st.st_atime_nsec) = split_ns(stat.atime_ns);
    (st.st_mtime, st.st_mtime_nsec) = split_ns(stat.mtime_ns);
    (st.st_ctime, st.st_ctime_nsec) = split_ns(stat.ctime_ns);
}

/// Fills `x` with the basic fields (`STATX_BASIC_STATS`).
pub fn fill_statx(stat: &FileStat, x: &mut libc::statx) {
    x.stx_mask = libc::STATX_BASIC_STATS;
    x.stx_blksize = stat.blksize as u32;
    x.stx_nlink = stat.nlink as u32;
    x.stx_uid = stat.uid;
    x.stx_gid = stat.gid;
    x.stx_mode = stat.mode as u16;
    x.stx_ino = stat.ino;
    x.stx_size = stat.size;
    x.stx_blocks = stat.blocks;
    for (at, ns) in [
        (&mut x.stx_atime, stat.atime_ns),
        (&mut x.stx_mtime, stat.mtime_ns),
        (&mut x.stx_ctime, stat.ctime_ns),
    ] {
        let (sec, nsec) = split_ns(ns);
        at.tv_sec = sec;
        at.tv_nsec = nsec as u32;
    }
    x.stx_rdev_major = libc::major(stat.rdev);
    x.stx_rdev_minor = libc::minor(stat.rdev);
    x.stx_dev_major = libc::major(stat.dev);
    x.stx_dev_minor = libc::minor(stat.dev);
}
