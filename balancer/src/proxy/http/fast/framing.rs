//! Where an HTTP/1.1 message body ends (RFC 9112 §6.3, §7.1), found without changing a byte.
//!
//! The fast path copies a worker's response body to the client as it arrives, so it never
//! decodes chunks; it only has to know where the body stops, because the bytes after it belong
//! to the next message and the keep-alive connection may only be reused once the body is over.
//! [`BodyScan`] follows the stream slice by slice and says how many leading bytes of each slice
//! are body. It keeps all of its state between calls, so the way the socket happens to split the
//! stream never changes the answer.
//!
//! The chunked scanner is strict where leniency lets two parsers disagree on where a message
//! ends (the root of request smuggling): every line must end in CRLF, a bare LF is an error, and
//! chunk data must be followed by exactly CRLF. Lines it does not interpret (chunk extensions,
//! trailer fields) are skipped but bounded, so a worker cannot make the proxy scan forever
//! without moving a body byte.

use std::cmp::min;

/// The longest chunk-size line accepted, CRLF included. A size needs at most 16 hex digits;
/// the rest is extensions, which nobody needs kilobytes of.
const MAX_CHUNK_LINE: usize = 4096;

/// The most bytes accepted after the last chunk (trailer fields and the final empty line).
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD responses, 1xx/204/304, requests with neither header).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: chunks, a last chunk, trailers.
    Chunked,
    /// The body ends when the sender closes the connection.
    UntilClose,
}

/// Why a chunked body cannot be followed. Every one of them means the connection's framing is
/// lost: the caller must close it rather than reuse it.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FramingError {
    /// A chunk-size line that does not start with a hex digit.
    #[error("chunk-size line has no hex digits")]
    MissingChunkSize,
    /// A byte that has no place in a chunk-size line (after the size, before any extension).
    #[error("unexpected byte {0:#04x} in a chunk-size line")]
    BadChunkSize(u8),
    /// A chunk size that does not fit in 64 bits.
    #[error("chunk size does not fit in 64 bits")]
    ChunkSizeOverflow,
    /// A chunk-size line (with its extensions) longer than [`MAX_CHUNK_LINE`].
    #[error("chunk-size line longer than {} bytes", MAX_CHUNK_LINE)]
    ChunkLineTooLong,
    /// A line ended by LF alone. Rejected rather than tolerated: a peer that accepts it and one
    /// that does not disagree on where the message ends.
    #[error("line ends in a bare LF instead of CRLF")]
    BareLf,
    /// A CR not followed by LF.
    #[error("CR followed by {0:#04x} instead of LF")]
    CrWithoutLf(u8),
    /// Chunk data followed by something other than CRLF: the size was a lie.
    #[error("chunk data followed by {0:#04x} instead of CRLF")]
    MissingDataCrlf(u8),
    /// More than [`MAX_TRAILER_BYTES`] after the last chunk.
    #[error("trailer section longer than {} bytes", MAX_TRAILER_BYTES)]
    TrailersTooLarge,
}

/// Follows one message body through the stream that carries it; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct BodyScan {
    /// Only [`remaining`](Self::remaining) needs it: a finished `Length` body and a finished
    /// chunked one are both `State::Done`.
    framing: Framing,
    state: State,
}

/// Where the scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The body has ended; nothing more is taken.
    Done,
    /// A `Content-Length` body with this many bytes still to come (never 0: that is `Done`).
    Length(u64),
    /// Everything is body until EOF.
    UntilClose,
    /// Inside a chunked body.
    Chunked(Chunk),
    /// A chunked body failed; every later call fails the same way, so a caller that ignores one
    /// error still cannot mistake garbage for a finished body.
    Failed(FramingError),
}

/// Where a chunked scan is. `line` counts the bytes of the current chunk-size line so far,
/// `total` the bytes of the trailer section so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits; `any` once at least one was read.
    Size { value: u64, any: bool, line: usize },
    /// After the size: whitespace, then `;` or CR.
    SizeWs { value: u64, line: usize },
    /// Skipping a chunk extension up to CR.
    Ext { value: u64, line: usize },
    /// After the CR of a chunk-size line.
    SizeLf { value: u64, line: usize },
    /// Inside chunk data (never 0 bytes left: those go to `DataCr`).
    Data { left: u64 },
    /// After chunk data, expecting CR.
    DataCr,
    /// After chunk data and CR, expecting LF.
    DataLf,
    /// After the last chunk, at the start of a trailer line (or of the final empty line).
    LineStart { total: usize },
    /// Inside a trailer field line.
    Field { total: usize },
    /// After the CR of a trailer field line.
    FieldLf { total: usize },
    /// After the CR of the final empty line.
    EndLf { total: usize },
}

impl BodyScan {
    /// A scan at the start of a body framed as `framing`.
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size {
                value: 0,
                any: false,
                line: 0,
            }),
            Framing::UntilClose => State::UntilClose,
        };
        BodyScan { framing, state }
    }

    /// Follows the next `bytes` of the stream (which may hold more than the body: the start of a
    /// next message). Returns how many leading bytes of `bytes` belong to the body; when fewer
    /// than `bytes.len()` are taken, the body has ended exactly there. Once the body has ended,
    /// returns `Ok(0)`.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        match &mut self.state {
            State::Done => Ok(0),
            State::UntilClose => Ok(bytes.len()),
            State::Failed(err) => Err(*err),
            State::Length(left) => {
                let taken = min_len(*left, bytes.len());
                *left -= taken as u64;
                if *left == 0 {
                    self.state = State::Done;
                }
                Ok(taken)
            }
            State::Chunked(_) => self.scan_chunked(bytes).inspect_err(|err| {
                self.state = State::Failed(*err);
            }),
        }
    }

    /// Whether the body has ended (always true for `Empty`; never true for `UntilClose`: the
    /// caller ends it at EOF).
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body is delimited by the sender closing the connection (`UntilClose`), so
    /// that EOF is its normal end rather than a truncated body.
    pub(crate) fn ends_at_close(&self) -> bool {
        self.framing == Framing::UntilClose
    }

    /// For `Length`: how many body bytes are still to come (`Some(0)` when done); `None` for the
    /// other framings. Lets a caller read no more than the body from a socket.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match (self.framing, self.state) {
            (Framing::Length(_), State::Length(left)) => Some(left),
            (Framing::Length(_), _) => Some(0),
            _ => None,
        }
    }

    /// The chunked part of [`scan`](Self::scan): data is skipped a whole slice at a time, the
    /// few framing bytes around it one at a time.
    fn scan_chunked(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        let mut at = 0;
        while at < bytes.len() {
            // Anything else: the last chunk's final CRLF was just read.
            let State::Chunked(chunk) = &mut self.state else {
                return Ok(at);
            };
            if let Chunk::Data { left } = chunk {
                let taken = min_len(*left, bytes.len() - at);
                at += taken;
                *left -= taken as u64;
                if *left == 0 {
                    *chunk = Chunk::DataCr;
                }
            } else {
                self.state = step(*chunk, bytes[at])?;
                at += 1;
            }
        }
        Ok(at)
    }
}

/// How many of `available` bytes a body with `left` bytes to go takes.
fn min_len(left: u64, available: usize) -> usize {
    // A `left` too big for usize is bigger than any slice.
    usize::try_from(left).map_or(available, |left| min(left, available))
}

/// The state after the framing byte `byte` (any byte outside chunk data).
fn step(chunk: Chunk, byte: u8) -> Result<State, FramingError> {
    let next = match chunk {
        Chunk::Size { value, any, line } => {
            let line = line_byte(line)?;
            match hex_value(byte) {
                Some(digit) => Chunk::Size {
                    value: value
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(digit))
                        .ok_or(FramingError::ChunkSizeOverflow)?,
                    any: true,
                    line,
                },
                None if !any => return Err(FramingError::MissingChunkSize),
                None => size_end(value, line, byte)?,
            }
        }
        Chunk::SizeWs { value, line } => size_end(value, line_byte(line)?, byte)?,
        Chunk::Ext { value, line } => {
            let line = line_byte(line)?;
            match byte {
                b'\r' => Chunk::SizeLf { value, line },
                b'\n' => return Err(FramingError::BareLf),
                _ => Chunk::Ext { value, line },
            }
        }
        Chunk::SizeLf { value, line } => {
            line_byte(line)?;
            match byte {
                b'\n' if value == 0 => Chunk::LineStart { total: 0 },
                b'\n' => Chunk::Data { left: value },
                other => return Err(FramingError::CrWithoutLf(other)),
            }
        }
        // Handled by the caller without a call per byte.
        Chunk::Data { left } => Chunk::Data { left },
        Chunk::DataCr => match byte {
            b'\r' => Chunk::DataLf,
            other => return Err(FramingError::MissingDataCrlf(other)),
        },
        Chunk::DataLf => match byte {
            b'\n' => Chunk::Size {
                value: 0,
                any: false,
                line: 0,
            },
            other => return Err(FramingError::MissingDataCrlf(other)),
        },
        Chunk::LineStart { total } => {
            let total = trailer_byte(total)?;
            match byte {
                b'\r' => Chunk::EndLf { total },
                b'\n' => return Err(FramingError::BareLf),
                _ => Chunk::Field { total },
            }
        }
        Chunk::Field { total } => {
            let total = trailer_byte(total)?;
            match byte {
                b'\r' => Chunk::FieldLf { total },
                b'\n' => return Err(FramingError::BareLf),
                _ => Chunk::Field { total },
            }
        }
        Chunk::FieldLf { total } => match byte {
            b'\n' => Chunk::LineStart {
                total: trailer_byte(total)?,
            },
            other => return Err(FramingError::CrWithoutLf(other)),
        },
        Chunk::EndLf { total } => match byte {
            b'\n' => {
                trailer_byte(total)?;
                return Ok(State::Done);
            }
            other => return Err(FramingError::CrWithoutLf(other)),
        },
    };
    Ok(State::Chunked(next))
}

/// What may follow a chunk size: whitespace, an extension, or the end of the line.
///
/// Whitespace before CR is accepted although RFC 9112 only allows it before `;`: hyper (which
/// parses these responses on the other path) accepts it too, and it cannot move the end of the
/// line, so it does not open a disagreement about where the body ends.
fn size_end(value: u64, line: usize, byte: u8) -> Result<Chunk, FramingError> {
    match byte {
        b' ' | b'\t' => Ok(Chunk::SizeWs { value, line }),
        b';' => Ok(Chunk::Ext { value, line }),
        b'\r' => Ok(Chunk::SizeLf { value, line }),
        b'\n' => Err(FramingError::BareLf),
        other => Err(FramingError::BadChunkSize(other)),
    }
}

/// Counts one more byte of a chunk-size line.
fn line_byte(line: usize) -> Result<usize, FramingError> {
    let line = line + 1;
    if line > MAX_CHUNK_LINE {
        return Err(FramingError::ChunkLineTooLong);
    }
    Ok(line)
}

/// Counts one more byte of the trailer section.
fn trailer_byte(total: usize) -> Result<usize, FramingError> {
    let total = total + 1;
    if total > MAX_TRAILER_BYTES {
        return Err(FramingError::TrailersTooLarge);
    }
    Ok(total)
}

/// The value of a hex digit, either case.
fn hex_value(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Node-style chunked body: two chunks, the last chunk, no trailers.
    const NODE_BODY: &[u8] = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    /// The start of the next message on the same connection.
    const NEXT: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Feeds `input` in one slice; the bytes taken, or the error.
    fn scan_all(framing: Framing, input: &[u8]) -> Result<(usize, bool), FramingError> {
        let mut scan = BodyScan::new(framing);
        let taken = scan.scan(input)?;
        Ok((taken, scan.is_done()))
    }

    /// Feeds `input` one byte at a time, stopping at the first byte not taken.
    fn scan_bytewise(framing: Framing, input: &[u8]) -> Result<(usize, bool), FramingError> {
        let mut scan = BodyScan::new(framing);
        let mut taken = 0;
        for byte in input.chunks(1) {
            let n = scan.scan(byte)?;
            taken += n;
            if n == 0 {
                break;
            }
        }
        Ok((taken, scan.is_done()))
    }

    fn chunked(input: &[u8]) -> Result<(usize, bool), FramingError> {
        scan_all(Framing::Chunked, input)
    }

    #[test]
    fn length_takes_exactly_its_bytes() {
        let mut scan = BodyScan::new(Framing::Length(5));
        assert_eq!(scan.scan(b"hello"), Ok(5));
        assert!(scan.is_done());
        assert_eq!(scan.remaining(), Some(0));
        assert_eq!(scan.scan(b"more"), Ok(0));
    }

    #[test]
    fn length_leaves_the_next_message() {
        let mut input = b"hello".to_vec();
        input.extend_from_slice(NEXT);
        let mut scan = BodyScan::new(Framing::Length(5));
        assert_eq!(scan.scan(&input), Ok(5));
        assert!(scan.is_done());
    }

    #[test]
    fn length_counts_down() {
        let mut scan = BodyScan::new(Framing::Length(10));
        assert_eq!(scan.remaining(), Some(10));
        assert_eq!(scan.scan(b"abc"), Ok(3));
        assert_eq!(scan.remaining(), Some(7));
        assert!(!scan.is_done());
        assert_eq!(scan.scan(b""), Ok(0));
        assert_eq!(scan.remaining(), Some(7));
        assert_eq!(scan.scan(b"defghijklmn"), Ok(7));
        assert_eq!(scan.remaining(), Some(0));
        assert!(scan.is_done());
    }

    #[test]
    fn huge_length_takes_whole_slices() {
        let mut scan = BodyScan::new(Framing::Length(u64::MAX));
        assert_eq!(scan.scan(&[0; 100]), Ok(100));
        assert_eq!(scan.remaining(), Some(u64::MAX - 100));
        assert!(!scan.is_done());
    }

    #[test]
    fn zero_length_is_done_at_once() {
        let mut scan = BodyScan::new(Framing::Length(0));
        assert!(scan.is_done());
        assert_eq!(scan.remaining(), Some(0));
        assert_eq!(scan.scan(NEXT), Ok(0));
    }

    #[test]
    fn empty_takes_nothing() {
        let mut scan = BodyScan::new(Framing::Empty);
        assert!(scan.is_done());
        assert_eq!(scan.scan(NEXT), Ok(0));
        assert!(scan.is_done());
    }

    #[test]
    fn until_close_takes_everything_and_never_ends() {
        let mut scan = BodyScan::new(Framing::UntilClose);
        assert_eq!(scan.scan(NODE_BODY), Ok(NODE_BODY.len()));
        assert_eq!(scan.scan(NEXT), Ok(NEXT.len()));
        assert!(!scan.is_done());
        assert!(scan.ends_at_close());
        assert_eq!(scan.remaining(), None);
    }

    #[test]
    fn remaining_is_none_unless_length() {
        let mut scan = BodyScan::new(Framing::Chunked);
        assert_eq!(scan.remaining(), None);
        assert_eq!(scan.scan(NODE_BODY), Ok(NODE_BODY.len()));
        assert!(scan.is_done());
        assert_eq!(scan.remaining(), None);
        assert!(!scan.ends_at_close());
        assert_eq!(BodyScan::new(Framing::Empty).remaining(), None);
    }

    #[test]
    fn node_body_ends_before_the_next_request() {
        let mut input = NODE_BODY.to_vec();
        input.extend_from_slice(NEXT);
        assert_eq!(chunked(&input), Ok((NODE_BODY.len(), true)));
        assert_eq!(
            scan_bytewise(Framing::Chunked, &input),
            Ok((NODE_BODY.len(), true))
        );
    }

    #[test]
    fn chunked_is_not_done_before_the_final_crlf() {
        let mut scan = BodyScan::new(Framing::Chunked);
        let (head, last) = NODE_BODY.split_at(NODE_BODY.len() - 1);
        assert_eq!(scan.scan(head), Ok(head.len()));
        assert!(!scan.is_done());
        assert_eq!(scan.scan(last), Ok(1));
        assert!(scan.is_done());
        assert_eq!(scan.scan(NEXT), Ok(0));
    }

    #[test]
    fn extensions_and_trailers_are_skipped() {
        let body = b"5;name=value;quoted=\"a;b\"\r\nhello\r\n\
                     3 ; x\r\nabc\r\n\
                     0;last\r\n\
                     Expires: never\r\nX-Checksum: 1234\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(NEXT);
        assert_eq!(chunked(&input), Ok((body.len(), true)));
        assert_eq!(
            scan_bytewise(Framing::Chunked, &input),
            Ok((body.len(), true))
        );
    }

    #[test]
    fn hex_sizes_in_either_case_and_with_leading_zeros() {
        let data = [b'x'; 0xab];
        for line in ["AB\r\n", "ab\r\n", "aB\r\n", "00ab\r\n", "ab \t\r\n"] {
            let mut body = line.as_bytes().to_vec();
            body.extend_from_slice(&data);
            body.extend_from_slice(b"\r\n0\r\n\r\n");
            assert_eq!(chunked(&body), Ok((body.len(), true)), "{line:?}");
        }
    }

    #[test]
    fn largest_size_is_accepted_and_one_more_digit_overflows() {
        let mut scan = BodyScan::new(Framing::Chunked);
        assert_eq!(scan.scan(b"ffffffffffffffff\r\n"), Ok(18));
        assert_eq!(scan.scan(&[0; 64]), Ok(64));
        assert!(!scan.is_done());
        assert_eq!(
            chunked(b"10000000000000000\r\n"),
            Err(FramingError::ChunkSizeOverflow)
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert_eq!(chunked(b"\r\n"), Err(FramingError::MissingChunkSize));
        assert_eq!(chunked(b";ext\r\n"), Err(FramingError::MissingChunkSize));
        assert_eq!(chunked(b"-5\r\n"), Err(FramingError::MissingChunkSize));
        assert_eq!(chunked(b"5g\r\n"), Err(FramingError::BadChunkSize(b'g')));
        assert_eq!(chunked(b"0x5\r\n"), Err(FramingError::BadChunkSize(b'x')));
        assert_eq!(chunked(b"5 5\r\n"), Err(FramingError::BadChunkSize(b'5')));
    }

    #[test]
    fn bare_lf_is_rejected_everywhere() {
        assert_eq!(chunked(b"5\nhello\r\n"), Err(FramingError::BareLf));
        assert_eq!(chunked(b"5;a=b\nhello\r\n"), Err(FramingError::BareLf));
        assert_eq!(chunked(b"5 \nhello\r\n"), Err(FramingError::BareLf));
        assert_eq!(chunked(b"0\r\nA: b\n\r\n"), Err(FramingError::BareLf));
        assert_eq!(chunked(b"0\r\n\n"), Err(FramingError::BareLf));
        assert_eq!(chunked(b"5\rhello"), Err(FramingError::CrWithoutLf(b'h')));
        assert_eq!(
            chunked(b"0\r\nA: b\rx"),
            Err(FramingError::CrWithoutLf(b'x'))
        );
        assert_eq!(chunked(b"0\r\n\rx"), Err(FramingError::CrWithoutLf(b'x')));
    }

    #[test]
    fn data_must_be_followed_by_crlf() {
        assert_eq!(
            chunked(b"5\r\nhello!\r\n"),
            Err(FramingError::MissingDataCrlf(b'!'))
        );
        assert_eq!(
            chunked(b"5\r\nhello\n0\r\n\r\n"),
            Err(FramingError::MissingDataCrlf(b'\n'))
        );
        assert_eq!(
            chunked(b"5\r\nhello\r0\r\n\r\n"),
            Err(FramingError::MissingDataCrlf(b'0'))
        );
    }

    #[test]
    fn long_chunk_lines_are_rejected() {
        let mut ok = b"5;".to_vec();
        ok.resize(MAX_CHUNK_LINE - 2, b'x');
        ok.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(chunked(&ok), Ok((ok.len(), true)));

        let mut long = b"5;".to_vec();
        long.resize(MAX_CHUNK_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(chunked(&long), Err(FramingError::ChunkLineTooLong));

        let zeros = vec![b'0'; MAX_CHUNK_LINE + 1];
        assert_eq!(chunked(&zeros), Err(FramingError::ChunkLineTooLong));
    }

    #[test]
    fn huge_trailers_are_rejected() {
        let mut ok = b"0\r\nX: ".to_vec();
        ok.resize(3 + MAX_TRAILER_BYTES - 4, b'v');
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(chunked(&ok), Ok((ok.len(), true)));
        // One byte more, and the final LF is one too many.
        let mut over = b"0\r\nX: ".to_vec();
        over.resize(3 + MAX_TRAILER_BYTES - 3, b'v');
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(chunked(&over), Err(FramingError::TrailersTooLarge));
        assert_eq!(
            scan_bytewise(Framing::Chunked, &over),
            Err(FramingError::TrailersTooLarge)
        );

        let mut huge = b"0\r\n".to_vec();
        for _ in 0..1000 {
            huge.extend_from_slice(b"X-Padding: 0123456789\r\n");
        }
        huge.extend_from_slice(b"\r\n");
        assert_eq!(chunked(&huge), Err(FramingError::TrailersTooLarge));
    }

    #[test]
    fn an_error_sticks() {
        let mut scan = BodyScan::new(Framing::Chunked);
        assert_eq!(scan.scan(b"z"), Err(FramingError::MissingChunkSize));
        assert_eq!(scan.scan(b"0\r\n\r\n"), Err(FramingError::MissingChunkSize));
        assert!(!scan.is_done());
    }

    /// One chunk as a sender might write it: the size in either case, with leading zeros or
    /// whitespace, maybe an extension.
    #[derive(Debug, Clone)]
    struct ChunkSpec {
        data: Vec<u8>,
        upper: bool,
        zeros: usize,
        ext: Option<String>,
    }

    fn chunk_spec(sizes: std::ops::Range<usize>) -> impl Strategy<Value = ChunkSpec> {
        (
            prop::collection::vec(any::<u8>(), sizes),
            any::<bool>(),
            0usize..3,
            prop::option::of("[ \t]*;[a-z]{1,8}(=[a-z0-9\"; ]{0,12})?"),
        )
            .prop_map(|(data, upper, zeros, ext)| ChunkSpec {
                data,
                upper,
                zeros,
                ext,
            })
    }

    fn size_line(spec: &ChunkSpec, size: usize) -> Vec<u8> {
        let hex = if spec.upper {
            format!("{size:X}")
        } else {
            format!("{size:x}")
        };
        let mut line = "0".repeat(spec.zeros).into_bytes();
        line.extend_from_slice(hex.as_bytes());
        if let Some(ext) = &spec.ext {
            line.extend_from_slice(ext.as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        line
    }

    /// A whole chunked body: `chunks` (none of them empty), the last chunk, the trailers.
    fn encode(chunks: &[ChunkSpec], last: &ChunkSpec, trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&size_line(chunk, chunk.data.len()));
            out.extend_from_slice(&chunk.data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(&size_line(last, 0));
        for field in trailers {
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(chunk_spec(1..300), 0..8),
            chunk_spec(0..1),
            prop::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,40}", 0..4),
        )
            .prop_map(|(chunks, last, trailers)| encode(&chunks, &last, &trailers))
    }

    /// Cuts `input` at `cuts` (taken modulo its length, sorted) into consecutive slices.
    fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        points.windows(2).map(|w| &input[w[0]..w[1]]).collect()
    }

    proptest! {
        #[test]
        fn any_split_finds_the_exact_end(
            body in body(),
            extra in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut input = body.clone();
            input.extend_from_slice(&extra);
            let mut scan = BodyScan::new(Framing::Chunked);
            let mut seen = 0;
            let mut taken = 0;
            for slice in split(&input, &cuts) {
                let n = scan.scan(slice).expect("a valid body");
                prop_assert!(n <= slice.len());
                if seen < body.len() {
                    // Everything up to the body's end is taken, nothing after it.
                    prop_assert_eq!(n, min(slice.len(), body.len() - seen));
                } else {
                    prop_assert_eq!(n, 0);
                }
                taken += n;
                seen += slice.len();
                prop_assert_eq!(scan.is_done(), seen >= body.len());
            }
            prop_assert_eq!(taken, body.len());
            prop_assert!(scan.is_done());
        }

        #[test]
        fn byte_at_a_time_finds_the_exact_end(
            body in body(),
            extra in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut input = body.clone();
            input.extend_from_slice(&extra);
            let mut scan = BodyScan::new(Framing::Chunked);
            for (at, byte) in input.chunks(1).enumerate() {
                let n = scan.scan(byte).expect("a valid body");
                prop_assert_eq!(n, usize::from(at < body.len()));
                prop_assert_eq!(scan.is_done(), at + 1 >= body.len());
            }
        }

        /// A corrupted body fails (or ends) the same way however it is split.
        #[test]
        fn splits_agree_on_corrupt_bodies(
            body in body(),
            at in any::<usize>(),
            byte in prop::sample::select(vec![b'\r', b'\n', b'0', b'f', b'G', b';', b' ', b'x']),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut input = body;
            let len = input.len();
            input[at % len] = byte;
            let whole = chunked(&input);
            let mut scan = BodyScan::new(Framing::Chunked);
            let mut pieces = Ok(0);
            for slice in split(&input, &cuts) {
                match scan.scan(slice) {
                    Ok(n) => pieces = pieces.map(|t| t + n),
                    Err(err) => {
                        pieces = Err(err);
                        break;
                    }
                }
            }
            prop_assert_eq!(whole, pieces.map(|t| (t, scan.is_done())));
        }

        #[test]
        fn length_takes_its_bytes_under_any_split(
            len in 0usize..500,
            extra in 0usize..64,
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let input = vec![7u8; len + extra];
            let mut scan = BodyScan::new(Framing::Length(len as u64));
            let mut taken = 0;
            for slice in split(&input, &cuts) {
                taken += scan.scan(slice).expect("length never fails");
                prop_assert_eq!(scan.remaining(), Some((len - taken) as u64));
            }
            prop_assert_eq!(taken, len);
            prop_assert!(scan.is_done());
        }
    }
}
