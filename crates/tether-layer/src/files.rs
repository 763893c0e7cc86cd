//! Remote files as the process sees them: a position kept here, reads served from a read-ahead
//! buffer so a file read line by line costs one round trip per [`READ_AHEAD`] bytes, not per
//! line. Safe code, unit-tested without preloading.

/// Bytes fetched per round trip when reading sequentially.
pub(crate) const READ_AHEAD: usize = 256 * 1024;

/// The largest write sent in one request.
pub(crate) const MAX_WRITE: usize = 512 * 1024;

/// A file opened in the target. Shared by every fd that refers to it (`dup`), as the kernel
/// shares one open file description.
#[derive(Debug)]
pub(crate) struct RemoteFile {
    pub handle: u64,
    pub path: String,
    pub position: u64,
    pub append: bool,
    /// The inode of the placeholder fd that stands for this file in the process.
    pub placeholder: u64,
    /// For a file copied whole into its placeholder: its metadata in the target (what `fstat`
    /// reports). Reads, seeks and writes of such a file are the placeholder's own.
    pub snapshot: Option<tether_protocol::FileStat>,
    /// Inherited through `fork`: the handle belongs to the parent, which closes it.
    pub inherited: bool,
    /// Bytes of the file from `buffer_at` on.
    buffer: Vec<u8>,
    buffer_at: u64,
}

impl RemoteFile {
    pub(crate) fn new(handle: u64, path: String, append: bool, placeholder: u64) -> RemoteFile {
        RemoteFile {
            handle,
            path,
            position: 0,
            append,
            placeholder,
            snapshot: None,
            inherited: false,
            buffer: Vec::new(),
            buffer_at: 0,
        }
    }

    /// Reads up to `want` bytes at `offset` into `out`: from the buffer when it covers `offset`,
    /// else after one `fetch(offset, len) -> (bytes, eof)`. Returns the count (0: end of file).
    pub(crate) fn read_at(
        &mut self,
        offset: u64,
        out: &mut [u8],
        fetch: impl FnOnce(u64, usize) -> Result<(Vec<u8>, bool), i32>,
    ) -> Result<usize, i32> {
        if out.is_empty() {
            return Ok(0);
        }
        let end = self.buffer_at + self.buffer.len() as u64;
        // At the end of what was read, ask again: the file may have grown (`tail -f`).
        let covered = offset >= self.buffer_at && offset < end;
        if !covered {
            let len = out.len().max(READ_AHEAD);
            let (bytes, _eof) = fetch(offset, len)?;
            self.buffer = bytes;
            self.buffer_at = offset;
        }
        let start = (offset - self.buffer_at) as usize;
        let available = &self.buffer[start.min(self.buffer.len())..];
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        Ok(n)
    }

    /// Reads at the position and advances it.
    pub(crate) fn read(
        &mut self,
        out: &mut [u8],
        fetch: impl FnOnce(u64, usize) -> Result<(Vec<u8>, bool), i32>,
    ) -> Result<usize, i32> {
        let n = self.read_at(self.position, out, fetch)?;
        self.position += n as u64;
        Ok(n)
    }

    /// Something wrote to the file: what was read ahead may be stale.
    pub(crate) fn invalidate(&mut self) {
        self.buffer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "remote" file of `size` bytes (byte i = i % 251) and a counter of round trips.
    fn remote(size: usize) -> (Vec<u8>, std::cell::Cell<usize>) {
        (
            (0..size).map(|i| (i % 251) as u8).collect(),
            std::cell::Cell::new(0),
        )
    }

    fn fetcher<'a>(
        content: &'a [u8],
        trips: &'a std::cell::Cell<usize>,
    ) -> impl FnOnce(u64, usize) -> Result<(Vec<u8>, bool), i32> + 'a {
        move |offset, len| {
            trips.set(trips.get() + 1);
            let start = (offset as usize).min(content.len());
            let end = (start + len).min(content.len());
            Ok((content[start..end].to_vec(), end == content.len()))
        }
    }

    #[test]
    fn small_sequential_reads_cost_one_round_trip_per_read_ahead() {
        let (content, trips) = remote(3 * READ_AHEAD + 10);
        let mut file = RemoteFile::new(1, "/f".into(), false, 0);
        let mut read = Vec::new();
        let mut buf = [0u8; 100];
        loop {
            let n = file.read(&mut buf, fetcher(&content, &trips)).unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        assert_eq!(read, content);
        // Four chunks, and one more at the end (a file may grow).
        assert_eq!(trips.get(), 5);
    }

    #[test]
    fn seeking_back_into_the_buffer_needs_no_round_trip_and_writes_invalidate() {
        let (content, trips) = remote(1000);
        let mut file = RemoteFile::new(1, "/f".into(), false, 0);
        let mut buf = [0u8; 10];
        file.read(&mut buf, fetcher(&content, &trips)).unwrap();
        file.position = 500;
        file.read(&mut buf, fetcher(&content, &trips)).unwrap();
        assert_eq!(buf[0], content[500]);
        assert_eq!(trips.get(), 1);
        file.invalidate();
        file.read(&mut buf, fetcher(&content, &trips)).unwrap();
        assert_eq!(trips.get(), 2);
    }

    #[test]
    fn data_appended_after_the_end_was_read_is_seen() {
        let (mut content, trips) = remote(100);
        let mut file = RemoteFile::new(1, "/f".into(), false, 0);
        let mut buf = [0u8; 200];
        assert_eq!(file.read(&mut buf, fetcher(&content, &trips)).unwrap(), 100);
        assert_eq!(file.read(&mut buf, fetcher(&content, &trips)).unwrap(), 0);
        content.extend_from_slice(b"more");
        assert_eq!(file.read(&mut buf, fetcher(&content, &trips)).unwrap(), 4);
        assert_eq!(&buf[..4], b"more");
    }

    #[test]
    fn errors_pass_through_and_leave_the_position() {
        let mut file = RemoteFile::new(1, "/f".into(), false, 0);
        let mut buf = [0u8; 10];
        assert_eq!(file.read(&mut buf, |_, _| Err(5)), Err(5));
        assert_eq!(file.position, 0);
    }
}
