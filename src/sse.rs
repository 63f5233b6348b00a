//! Server-sent events, parsed in linear time with a bounded event size.
//!
//! The event-stream grammar of the HTML standard ("9.2.6 Interpreting an event stream"): lines
//! end in CRLF, LF or CR; a blank line dispatches the event; `data` lines accumulate, joined by
//! LF; a line starting with `:` is a comment; a field with no colon has an empty value; one space
//! after the colon is stripped; `id` containing NUL is ignored; `retry` is digits only; a BOM at
//! the start of the stream is skipped; an unfinished event at the end of the stream is dropped.
//!
//! Every byte is looked at a bounded number of times, whatever the chunking: a partial line is
//! kept and only the new bytes are searched for a line end. An event (its pending line plus the
//! `data` gathered so far) larger than `max_event_bytes` is an error, so an upstream cannot make
//! the gateway buffer without limit or spend CPU on a line that never ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event` field; `message` when none was given.
    pub event: String,
    /// The `data` lines, joined by LF.
    pub data: String,
    /// The last event id seen so far in the stream (it carries over between events).
    pub id: String,
    /// A `retry` field in this event, if any.
    pub retry: Option<Duration>,
}

/// Why an event stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum SseError<E> {
    #[error("upstream sent an SSE event larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Transport(E),
}

/// The incremental parser: feed it bytes in any chunking, collect the events.
#[derive(Debug)]
pub struct Parser {
    max_event_bytes: usize,
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended in CR: an LF starting the next chunk belongs to that line end.
    after_cr: bool,
    /// No line has been completed yet and a BOM may still be at the start of `line`.
    at_start: bool,
    data: String,
    event: String,
    last_id: String,
    retry: Option<Duration>,
    /// A `data` field was seen since the last dispatch (an empty `data:` line counts).
    has_data: bool,
}

impl Parser {
    pub fn new(max_event_bytes: usize) -> Self {
        Parser {
            max_event_bytes,
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            data: String::new(),
            event: String::new(),
            last_id: String::new(),
            retry: None,
            has_data: false,
        }
    }

    /// Parses `chunk`, appending each complete event to `out`. After an error the parser must
    /// not be fed again.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut VecDeque<Event>) -> Result<(), usize> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) else {
                self.check_size(chunk.len())?;
                self.line.extend_from_slice(chunk);
                return Ok(());
            };
            self.check_size(end)?;
            let ending_len = match (chunk[end], chunk.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            if self.line.is_empty() {
                self.process_line(&chunk[..end], out);
            } else {
                self.line.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, out);
                // Keep the allocation for the next long line.
                self.line = line;
                self.line.clear();
            }
            chunk = &chunk[end + ending_len..];
        }
        Ok(())
    }

    /// Errs with the limit when `more` bytes would make the pending event too large.
    fn check_size(&self, more: usize) -> Result<(), usize> {
        if self.line.len() + self.data.len() + more > self.max_event_bytes {
            Err(self.max_event_bytes)
        } else {
            Ok(())
        }
    }

    fn process_line(&mut self, mut line: &[u8], out: &mut VecDeque<Event>) {
        if std::mem::take(&mut self.at_start) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        match name {
            b"data" => {
                self.has_data = true;
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            b"event" => self.event = String::from_utf8_lossy(value).into_owned(),
            b"id" if !value.contains(&0) => self.last_id = String::from_utf8_lossy(value).into(),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(ms) = std::str::from_utf8(value).unwrap_or("").parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<Event>) {
        let event = std::mem::take(&mut self.event);
        let retry = self.retry.take();
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        out.push_back(Event {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data,
            id: self.last_id.clone(),
            retry,
        });
    }
}

/// The events of a byte stream (an HTTP response body).
pub struct EventStream<S> {
    inner: S,
    parser: Parser,
    ready: VecDeque<Event>,
    /// Set after the inner stream ended or an error was returned.
    done: bool,
}

impl<S> EventStream<S> {
    pub fn new(inner: S, max_event_bytes: usize) -> Self {
        EventStream {
            inner,
            parser: Parser::new(max_event_bytes),
            ready: VecDeque::new(),
            done: false,
        }
    }
}

impl<S, E> Stream for EventStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Event, SseError<E>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            // One chunk per loop turn: the work per poll is bounded by the chunk's size, and
            // the events of a chunk go out before the next chunk is read.
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if let Err(limit) = this.parser.feed(&chunk, &mut this.ready) {
                        this.done = true;
                        this.ready.clear();
                        return Poll::Ready(Some(Err(SseError::TooLarge { limit })));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(SseError::Transport(e))));
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]], max: usize) -> Result<Vec<Event>, usize> {
        let mut p = Parser::new(max);
        let mut out = VecDeque::new();
        for c in chunks {
            p.feed(c, &mut out)?;
        }
        Ok(out.into())
    }

    fn parse(text: &str) -> Vec<Event> {
        parse_chunks(&[text.as_bytes()], 1 << 20).expect("parse")
    }

    /// Every split of `text` into two chunks, and byte by byte, gives the same events.
    fn same_in_any_chunking(text: &str) -> Vec<Event> {
        let whole = parse(text);
        let b = text.as_bytes();
        for i in 0..=b.len() {
            assert_eq!(
                parse_chunks(&[&b[..i], &b[i..]], 1 << 20).expect("split"),
                whole,
                "split at {i} of {text:?}"
            );
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes, 1 << 20).expect("bytes"), whole);
        whole
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn line_endings_lf_cr_crlf() {
        for text in [
            "data: a\n\ndata: b\n\n",
            "data: a\r\rdata: b\r\r",
            "data: a\r\n\r\ndata: b\r\n\r\n",
            "data: a\r\n\ndata: b\r\r\n",
        ] {
            assert_eq!(data(&same_in_any_chunking(text)), ["a", "b"], "{text:?}");
        }
    }

    #[test]
    fn cr_at_a_chunk_boundary_is_one_line_end() {
        // CR ends the chunk, LF starts the next: one line end, not a blank line.
        let events = parse_chunks(&[b"data: a\r", b"\ndata: b\r\n\r\n"], 1024).expect("parse");
        assert_eq!(data(&events), ["a\nb"]);
        // CR then CR: two line ends, the second dispatches.
        let events = parse_chunks(&[b"data: a\r", b"\rdata: b\n\n"], 1024).expect("parse");
        assert_eq!(data(&events), ["a", "b"]);
    }

    #[test]
    fn spec_example_multi_line_data_and_comments() {
        // The spec's examples: a comment, then two data lines joined by LF.
        let events = same_in_any_chunking(": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n");
        assert_eq!(
            data(&events),
            ["first event", "second event", " third event"]
        );
        assert_eq!(events[0].id, "1");
        assert_eq!(events[1].id, "", "`id` with no colon resets the last id");
        let events = same_in_any_chunking("data: YHOO\ndata: +2\ndata: 10\n\n");
        assert_eq!(data(&events), ["YHOO\n+2\n10"]);
    }

    #[test]
    fn field_without_colon_and_empty_data() {
        // "data" alone is a data field with an empty value; two of them make one LF.
        let events = same_in_any_chunking("data\n\ndata\ndata\n\ndata:\n\n");
        assert_eq!(data(&events), ["", "\n", ""]);
        // No data field at all: nothing is dispatched.
        assert!(same_in_any_chunking("event: x\n\n:comment\n\nid: 7\n\n").is_empty());
    }

    #[test]
    fn one_space_after_the_colon_is_stripped() {
        assert_eq!(data(&parse("data:x\n\n")), ["x"]);
        assert_eq!(data(&parse("data: x\n\n")), ["x"]);
        assert_eq!(data(&parse("data:  x\n\n")), [" x"]);
        assert_eq!(data(&parse("data:\tx\n\n")), ["\tx"]);
        assert_eq!(data(&parse("data: a: b\n\n")), ["a: b"]);
    }

    #[test]
    fn event_id_and_retry() {
        let events =
            same_in_any_chunking("event: add\nid: 42\nretry: 1500\ndata: x\n\ndata: y\n\n");
        assert_eq!(events[0].event, "add");
        assert_eq!(events[0].id, "42");
        assert_eq!(events[0].retry, Some(Duration::from_millis(1500)));
        assert_eq!(events[1].event, "message", "the type resets per event");
        assert_eq!(events[1].id, "42", "the last id carries over");
        assert_eq!(events[1].retry, None);
        let events = parse("retry: 15x\nretry: -1\nretry:\nid: a\0b\ndata: z\n\n");
        assert_eq!(events[0].retry, None, "retry must be digits only");
        assert_eq!(events[0].id, "", "an id with NUL is ignored");
        let events = parse("Data: no\nDATA: no\nunknown: x\ndata: yes\n\n");
        assert_eq!(data(&events), ["yes"], "field names are case-sensitive");
    }

    #[test]
    fn bom_only_at_stream_start() {
        assert_eq!(
            data(&same_in_any_chunking("\u{feff}data: a\n\n")),
            ["a"],
            "a leading BOM is skipped, even split over chunks"
        );
        // A second BOM is not skipped: the line's field name is then "\u{feff}data".
        assert!(parse("\u{feff}\u{feff}data: a\n\n").is_empty());
        assert_eq!(
            data(&parse("data: a\n\n\u{feff}data: b\n\n")),
            ["a"],
            "a BOM later is part of the line"
        );
        assert_eq!(data(&parse("\u{feff}\ndata: a\n\n")), ["a"]);
    }

    #[test]
    fn unfinished_event_at_the_end_is_dropped() {
        assert_eq!(data(&parse("data: a\n\ndata: b\n")), ["a"]);
        assert_eq!(data(&parse("data: a\n\ndata: b")), ["a"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let events = parse_chunks(&[b"data: a\xFFb\n\n"], 1024).expect("parse");
        assert_eq!(data(&events), ["a\u{fffd}b"]);
        // A character split over two chunks is whole: lines are decoded once complete.
        let euro = "€".as_bytes();
        let events =
            parse_chunks(&[b"data: ", &euro[..1], &euro[1..], b"\n\n"], 1024).expect("parse");
        assert_eq!(data(&events), ["€"]);
    }

    #[test]
    fn event_size_is_bounded() {
        // A line that never ends: refused once it passes the limit, whatever the chunking.
        let mut p = Parser::new(100);
        let mut out = VecDeque::new();
        let mut fed = 0;
        let err = loop {
            match p.feed(&[b'x'; 7], &mut out) {
                Ok(()) => fed += 7,
                Err(limit) => break limit,
            }
        };
        assert_eq!(err, 100);
        assert!(fed <= 100 && fed > 90, "{fed}");
        // Many short data lines add up to one event.
        let many = "data: 0123456789\n".repeat(10);
        assert_eq!(parse_chunks(&[many.as_bytes()], 100), Err(100));
        // At the limit exactly is fine; the count resets per event.
        let at = format!("data:{}\n\n", "y".repeat(95));
        assert_eq!(parse_chunks(&[at.as_bytes(); 5], 100).expect("ok").len(), 5);
    }

    #[tokio::test]
    async fn stream_yields_events_then_the_size_error() {
        use futures_util::StreamExt;
        let chunks: Vec<Result<Bytes, ()>> = vec![
            Ok(Bytes::from_static(b"data: 1\n\ndata: 2\n\ndata: 3")),
            Ok(Bytes::from_static(b"\n\n")),
            Ok(Bytes::from(vec![b'x'; 200])),
            Ok(Bytes::from_static(b"data: never\n\n")),
        ];
        let mut s = EventStream::new(futures_util::stream::iter(chunks), 64);
        for want in ["1", "2", "3"] {
            assert_eq!(s.next().await.expect("event").expect("ok").data, want);
        }
        assert!(matches!(
            s.next().await,
            Some(Err(SseError::TooLarge { limit: 64 }))
        ));
        assert!(s.next().await.is_none(), "nothing after the error");
    }
}
