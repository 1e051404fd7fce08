//! An incremental Server-Sent Events splitter. Pingora pushes body chunks, so this cuts events
//! out of whatever chunks arrive: lines end with CR, LF or CRLF (also split across chunks) and
//! an empty line ends an event. Each event comes out as its raw bytes (so a stream can be
//! re-emitted byte for byte) plus its `event:` name and joined `data:`.

use bytes::{Bytes, BytesMut};

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The bytes exactly as received, terminators included.
    pub raw: Bytes,
    pub event: Option<String>,
    /// `data:` lines joined with `\n` (one leading space of each removed, as the spec says).
    pub data: String,
}

/// Keeps the bytes of the event being received.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: BytesMut,
    /// Where the next line starts (everything before is complete lines of the pending event).
    line_start: usize,
}

impl Splitter {
    /// Feeds a chunk; complete events are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        self.buf.extend_from_slice(chunk);
        self.split(false, out);
    }

    /// The stream ended: a final CR ends its line, and what is left is returned (an event
    /// without its closing empty line, which the spec says to discard).
    pub fn finish(&mut self, out: &mut Vec<Event>) -> Bytes {
        self.split(true, out);
        self.take_pending()
    }

    fn split(&mut self, at_end: bool, out: &mut Vec<Event>) {
        let mut i = self.line_start;
        while i < self.buf.len() {
            let b = self.buf[i];
            let next = match b {
                b'\n' => i + 1,
                b'\r' => match self.buf.get(i + 1) {
                    Some(b'\n') => i + 2,
                    Some(_) => i + 1,
                    // A CR at the end may be the first half of a CRLF: wait for more.
                    None if at_end => i + 1,
                    None => break,
                },
                _ => {
                    i += 1;
                    continue;
                }
            };
            let empty = i == self.line_start;
            self.line_start = next;
            i = next;
            if empty {
                let raw = self.buf.split_to(next).freeze();
                self.line_start = 0;
                i = 0;
                out.push(parse(raw));
            }
        }
    }

    /// Bytes of an event not yet complete.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Takes the incomplete rest (at the end of the stream).
    pub fn take_pending(&mut self) -> Bytes {
        self.line_start = 0;
        self.buf.split().freeze()
    }
}

fn parse(raw: Bytes) -> Event {
    let mut event = None;
    let mut data: Option<String> = None;
    let text = String::from_utf8_lossy(&raw);
    for line in text.split(['\n', '\r']) {
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    Event {
        raw,
        event,
        data: data.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\n: comment\rdata: [DONE]\r\r";

    fn split(chunks: &[&[u8]]) -> (Vec<Event>, Bytes) {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        let rest = s.finish(&mut out);
        (out, rest)
    }

    #[test]
    fn events_with_every_line_ending() {
        let (events, rest) = split(&[STREAM]);
        assert!(rest.is_empty());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event.as_deref(), Some("message_start"));
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].data, "x\ny");
        assert_eq!(events[2].data, "[DONE]");
        let joined: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(joined, STREAM, "raw bytes are kept exactly");
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let (whole, _) = split(&[STREAM]);
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let (events, rest) = split(&[&STREAM[..a], &STREAM[a..b], &STREAM[b..]]);
                assert!(rest.is_empty(), "split at {a},{b}");
                assert_eq!(events, whole, "split at {a},{b}");
            }
        }
    }

    #[test]
    fn an_unfinished_event_stays_pending() {
        let (events, rest) = split(&[b"data: 1\n\ndata: 2\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(&rest[..], b"data: 2\n");
    }
}
