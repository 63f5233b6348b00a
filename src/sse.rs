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
use tungstenite::Utf8Bytes;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event` field; `None` when none was given (the type is then `message`, see
    /// [`Event::kind`]): no string is made for the type of an event that names none.
    pub event: Option<String>,
    /// The `data` lines, joined by LF. An event with one `data` line that arrived within one
    /// body frame (the common case) shares that frame's bytes: nothing is copied.
    pub data: Utf8Bytes,
    /// The last event id seen so far in the stream (it carries over between events).
    pub id: Utf8Bytes,
    /// A `retry` field in this event, if any.
    pub retry: Option<Duration>,
}

impl Event {
    /// The event's type: its `event` field, else `message`.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }
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
    /// The pending event's only `data` line so far, when it lay within one frame and is valid
    /// UTF-8: a slice of that frame. Moved into `data` once a second line comes.
    one: Option<Utf8Bytes>,
    /// The pending event's `data` lines, each followed by LF, when they are not in `one`.
    data: String,
    /// What the pending event's `data` amounts to, decoded, with an LF per line (whether it is
    /// in `one` or in `data`): what the size bound counts.
    data_len: usize,
    event: Option<String>,
    last_id: Utf8Bytes,
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
            one: None,
            data: String::new(),
            data_len: 0,
            event: None,
            last_id: Utf8Bytes::default(),
            retry: None,
            has_data: false,
        }
    }

    /// [`Parser::feed_frame`] for bytes not already in a [`Bytes`] (they are copied into one).
    pub fn feed(&mut self, chunk: &[u8], out: &mut VecDeque<Event>) -> Result<(), usize> {
        self.feed_frame(&Bytes::copy_from_slice(chunk), out)
    }

    /// Parses `frame`, appending each complete event to `out`. An event whose data is one line
    /// within `frame` keeps a slice of it rather than a copy. After an error the parser must
    /// not be fed again.
    pub fn feed_frame(&mut self, frame: &Bytes, out: &mut VecDeque<Event>) -> Result<(), usize> {
        let mut chunk = &frame[..];
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
                self.process_line(&chunk[..end], Some(frame), out);
            } else {
                self.line.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, None, out);
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
        if self.line.len() + self.data_len + more > self.max_event_bytes {
            Err(self.max_event_bytes)
        } else {
            Ok(())
        }
    }

    /// `frame`: the frame `line` lies in, when it lies in one (not gathered across frames).
    fn process_line(&mut self, mut line: &[u8], frame: Option<&Bytes>, out: &mut VecDeque<Event>) {
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
            b"data" => self.push_data(value, frame),
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"id" if !value.contains(&0) => {
                self.last_id = String::from_utf8_lossy(value).into_owned().into();
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(ms) = std::str::from_utf8(value).unwrap_or("").parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
    }

    /// Adds one `data` line's value. Invalid UTF-8 is replaced line by line, as it is decoded.
    fn push_data(&mut self, value: &[u8], frame: Option<&Bytes>) {
        let first = !std::mem::replace(&mut self.has_data, true);
        if let (true, Some(frame)) = (first, frame) {
            if let Ok(text) = Utf8Bytes::try_from(frame.slice_ref(value)) {
                self.data_len = text.len() + 1;
                self.one = Some(text);
                return;
            }
        }
        if let Some(one) = self.one.take() {
            self.data.push_str(&one);
            self.data.push('\n');
        }
        let before = self.data.len();
        self.data.push_str(&String::from_utf8_lossy(value));
        self.data.push('\n');
        self.data_len += self.data.len() - before;
    }

    fn dispatch(&mut self, out: &mut VecDeque<Event>) {
        let event = self.event.take();
        let retry = self.retry.take();
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        self.data_len = 0;
        let data = match self.one.take() {
            Some(one) => one,
            None => {
                let mut data = std::mem::take(&mut self.data);
                data.pop();
                data.into()
            }
        };
        out.push_back(Event {
            event,
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

    /// The byte stream underneath.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
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
                    if let Err(limit) = this.parser.feed_frame(&chunk, &mut this.ready) {
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
        assert_eq!(events[0].kind(), "add");
        assert_eq!(events[0].id, "42");
        assert_eq!(events[0].retry, Some(Duration::from_millis(1500)));
        assert_eq!(events[1].kind(), "message", "the type resets per event");
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

    /// Where an event's `data` lies: within `frame`, or elsewhere (a copy).
    fn shares(event: &Event, frame: &Bytes) -> bool {
        let range = frame.as_ptr_range();
        let data = event.data.as_bytes().as_ptr_range();
        !event.data.is_empty() && range.start <= data.start && data.end <= range.end
    }

    #[test]
    fn one_line_data_within_a_frame_is_not_copied() {
        let mut p = Parser::new(1 << 20);
        let mut out = VecDeque::new();
        let frame =
            Bytes::from_static(b"data: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: x\ndata: y\n\n");
        p.feed_frame(&frame, &mut out).expect("parse");
        let events: Vec<Event> = out.drain(..).collect();
        assert_eq!(data(&events), ["{\"a\":1}", "x\ny"]);
        assert!(
            shares(&events[0], &frame),
            "one line in one frame: a slice of it"
        );
        assert!(
            !shares(&events[1], &frame),
            "two lines are joined in a copy"
        );
        // The id carries over without a copy per event.
        let frame = Bytes::from_static(b"id: 7\ndata: a\n\ndata: b\n\n");
        p.feed_frame(&frame, &mut out).expect("parse");
        assert_eq!(out[0].id, "7");
        assert_eq!(out[1].id.as_ptr(), out[0].id.as_ptr());
    }

    /// A stream of typical upstream events cut at every byte: the same events as in one frame,
    /// and each event's `data` is a slice of the frame it ended in exactly when its one line
    /// lay within that frame.
    #[test]
    fn split_at_every_point_gives_the_same_events() {
        let text: &[u8] = b"\xEF\xBB\xBFdata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n: ping\r\ndata: \xE2\x82\xAC\n\nevent: add\ndata: one\ndata: two\r\rdata: [DONE]\n\n";
        let whole = parse_chunks(&[text], 1 << 20).expect("whole");
        assert_eq!(
            data(&whole),
            [
                r#"{"choices":[{"delta":{"content":"Hel"}}]}"#,
                "€",
                "one\ntwo",
                "[DONE]"
            ]
        );
        // Where each event's `data:` line starts and ends (its line end excluded).
        let lines: Vec<(usize, usize)> = [
            &b"data: {"[..],
            b"data: \xE2",
            b"data: one",
            b"data: [DONE]",
        ]
        .iter()
        .map(|needle| {
            let start = text
                .windows(needle.len())
                .position(|w| w == *needle)
                .expect("line");
            let end = start + memchr::memchr2(b'\n', b'\r', &text[start..]).expect("end");
            (start, end)
        })
        .collect();
        // The first line starts with the BOM: a cut inside it splits the line.
        let lines: Vec<(usize, usize)> = [(0, lines[0].1)]
            .into_iter()
            .chain(lines[1..].iter().copied())
            .collect();
        for cut in 0..=text.len() {
            let frames = [
                Bytes::copy_from_slice(&text[..cut]),
                Bytes::copy_from_slice(&text[cut..]),
            ];
            let mut p = Parser::new(1 << 20);
            let mut out = VecDeque::new();
            let mut got = Vec::new();
            for frame in &frames {
                p.feed_frame(frame, &mut out).expect("split");
                for event in out.drain(..) {
                    got.push((event, frame.clone()));
                }
            }
            let events: Vec<Event> = got.iter().map(|(e, _)| e.clone()).collect();
            assert_eq!(events, whole, "cut at {cut}");
            for (i, (event, frame)) in got.iter().enumerate() {
                if i == 2 {
                    assert!(
                        !shares(event, &frames[0]) && !shares(event, &frames[1]),
                        "two lines: a copy"
                    );
                    continue;
                }
                let (start, end) = lines[i];
                // A line whose end is in the next frame is gathered there: a copy.
                let within = end < cut || start >= cut;
                assert_eq!(
                    shares(event, frame) || shares(event, &frames[0]),
                    within,
                    "cut at {cut}, event {i}"
                );
            }
        }
    }

    #[test]
    fn bound_counts_the_same_whatever_the_path() {
        // One line within a frame (a slice) or across frames (a copy): the same limit.
        let at = format!("data:{}\n\n", "y".repeat(95));
        for cut in 0..at.len() {
            let (a, b) = at.as_bytes().split_at(cut);
            assert_eq!(
                parse_chunks(&[a, b], 100).expect("at the limit").len(),
                1,
                "cut {cut}"
            );
            let over = format!("data:{}\ndata:\n\n", "y".repeat(95));
            let (a, b) = over.as_bytes().split_at(cut.min(over.len()));
            assert_eq!(parse_chunks(&[a, b], 100), Err(100), "cut {cut}");
        }
        // Invalid UTF-8 counts as decoded (U+FFFD is 3 bytes), in a slice or not.
        let mut bad = b"data:".to_vec();
        bad.extend([0xFF; 33]);
        bad.extend_from_slice(b"\n\n");
        for cut in 0..bad.len() {
            let (a, b) = bad.split_at(cut);
            assert_eq!(parse_chunks(&[a, b], 99), Err(99), "cut {cut}");
            let events = parse_chunks(&[a, b], 100).expect("fits decoded");
            assert_eq!(events[0].data.as_str(), "\u{fffd}".repeat(33), "cut {cut}");
        }
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
