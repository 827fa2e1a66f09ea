//! What every protocol's reassembly produces: messages (a request or a response with its
//! headers, body and timing), independent of the wire format they came in.

/// An HTTP version as the payload reports it (`proto_major`, `proto_minor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    pub const HTTP_1_1: Self = Self { major: 1, minor: 1 };
    pub const HTTP_2: Self = Self { major: 2, minor: 0 };

    pub fn http1(minor: u8) -> Self {
        Self { major: 1, minor }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Request,
    Response,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub bytes: Vec<u8>,
    /// More bytes arrived than the configured maximum; the rest was dropped.
    pub truncated: bool,
    /// Part of the body was never captured (a gap inside it).
    pub incomplete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, target: String },
    Response { status: u16 },
}

/// Header fields in arrival order, held as one text plus where each field's name and value
/// sit in it: one allocation for all of a message's fields (an HTTP/1 head or an HPACK block)
/// instead of two per field. The text keeps what `replace_runs` and `retain_names` took out,
/// so only the spans may ever be read (`Debug` included).
#[derive(Clone, Default)]
pub struct Fields {
    text: String,
    spans: Vec<FieldSpan>,
}

/// Where a field's name and value sit in the text, as (start, end); `u32`s keep a span at 16
/// bytes, which sorting moves around.
#[derive(Clone, Copy, Debug)]
struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

fn range((start, end): (u32, u32)) -> std::ops::Range<usize> {
    start as usize..end as usize
}

impl Fields {
    pub fn with_capacity(text_bytes: usize, fields: usize) -> Self {
        Self {
            text: String::with_capacity(text_bytes),
            spans: Vec::with_capacity(fields),
        }
    }

    /// Fields whose names and values all lie in `buffer` (an HTTP/1 head): the stretch of it
    /// from the first name to the last value is checked as UTF-8 and copied whole, and each
    /// field found by where it lies in it, instead of a check and two copies per field. None
    /// when that stretch is not UTF-8, or a part lies outside it (out of order, or outside
    /// `buffer`) or cuts a character.
    pub fn from_buffer<'b>(
        buffer: &'b [u8],
        pairs: impl ExactSizeIterator<Item = (&'b [u8], &'b [u8])>,
    ) -> Option<Self> {
        let offset = |part: &[u8]| {
            let start = (part.as_ptr() as usize).checked_sub(buffer.as_ptr() as usize)?;
            let end = start + part.len();
            (end <= buffer.len()).then_some((start as u32, end as u32))
        };
        let mut spans: Vec<FieldSpan> = Vec::with_capacity(pairs.len());
        for (name, value) in pairs {
            spans.push(FieldSpan {
                name: offset(name)?,
                value: offset(value)?,
            });
        }
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Some(Self::default());
        };
        let (start, end) = (first.name.0, last.value.1);
        let text = std::str::from_utf8(buffer.get(range((start, end)))?).ok()?;
        // httparse hands the fields on in order, each edge next to an ASCII byte; a part out of
        // order or cutting a character gives None rather than a field that panics when read.
        let within = |(from, to): (u32, u32)| {
            let part = (from.checked_sub(start)?, to.checked_sub(start)?);
            let edges = [part.0, part.1];
            let fits = to <= end && edges.iter().all(|&at| text.is_char_boundary(at as usize));
            fits.then_some(part)
        };
        for span in &mut spans {
            span.name = within(span.name)?;
            span.value = within(span.value)?;
        }
        Some(Self {
            text: text.to_owned(),
            spans,
        })
    }

    fn append_text(&mut self, part: &str) -> (u32, u32) {
        let start = self.text.len();
        self.text.push_str(part);
        let end = u32::try_from(self.text.len()).expect("a message's fields take under 4 GiB");
        (start as u32, end)
    }

    pub fn push(&mut self, name: &str, value: &str) {
        let name = self.append_text(name);
        let value = self.append_text(value);
        self.spans.push(FieldSpan { name, value });
    }

    fn name_of(&self, span: &FieldSpan) -> &str {
        &self.text[range(span.name)]
    }

    fn value_of(&self, span: &FieldSpan) -> &str {
        &self.text[range(span.value)]
    }

    /// (name, value) in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> + Clone {
        self.spans
            .iter()
            .map(|span| (self.name_of(span), self.value_of(span)))
    }

    /// The first value of `name`, its case ignored. Names are compared as bytes (lengths
    /// first), and only the found field's value is sliced: several lookups run per message.
    pub fn get(&self, name: &str) -> Option<&str> {
        let text = self.text.as_bytes();
        self.spans
            .iter()
            .find(|span| text[range(span.name)].eq_ignore_ascii_case(name.as_bytes()))
            .map(|span| self.value_of(span))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Appends `other`'s fields after these.
    pub fn append(&mut self, other: &Fields) {
        for (name, value) in other.iter() {
            self.push(name, value);
        }
    }

    /// Keeps the fields whose name `keep` accepts.
    pub fn retain_names(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let text = &self.text;
        self.spans.retain(|span| keep(&text[range(span.name)]));
    }

    /// Orders the fields by name (bytewise); a stable sort keeps each name's values in order.
    pub fn sort_by_name(&mut self) {
        // Bytes order as their `str`s do, without a char-boundary check per comparison; most
        // names differ in their first byte, decided here without a call to `memcmp`.
        let text = self.text.as_bytes();
        let name = |span: &FieldSpan| &text[range(span.name)];
        self.spans.sort_by(|a, b| {
            let (a, b) = (name(a), name(b));
            a.first().cmp(&b.first()).then_with(|| a.cmp(b))
        });
    }

    /// Runs of adjacent fields of one name: each name once with its values, when sorted.
    pub fn runs(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = &str> + Clone)> {
        self.spans
            .chunk_by(|a, b| self.name_of(a) == self.name_of(b))
            .map(|run| {
                (
                    self.name_of(&run[0]),
                    run.iter().map(|span| self.value_of(span)),
                )
            })
    }

    /// Replaces each run of adjacent fields whose name `covered` accepts by one field of that
    /// name with the value `marker`.
    pub fn replace_runs(&mut self, covered: impl Fn(&str) -> bool, marker: &str) {
        let mut marker_span = None;
        let mut start = 0;
        while start < self.spans.len() {
            let name = self.name_of(&self.spans[start]);
            let end = start
                + self.spans[start..]
                    .iter()
                    .take_while(|span| self.name_of(span) == name)
                    .count();
            if covered(name) {
                let value = *marker_span.get_or_insert_with(|| self.append_text(marker));
                self.spans[start].value = value;
                self.spans.drain(start + 1..end);
                start += 1;
            } else {
                start = end;
            }
        }
    }

    /// Heap bytes held.
    pub fn heap_size(&self) -> usize {
        self.text.capacity() + self.spans.capacity() * std::mem::size_of::<FieldSpan>()
    }
}

#[cfg(test)]
impl Fields {
    /// The fields as owned pairs, for assertions.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }
}

/// Fields are equal when they hold the same (name, value) pairs in the same order, however
/// their text is laid out.
impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Fields {}

/// The fields' pairs, never the text: it still holds redacted values.
impl std::fmt::Debug for Fields {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_list().entries(self.iter()).finish()
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Self {
        let mut fields = Self::default();
        for (name, value) in pairs {
            fields.push(name.as_ref(), value.as_ref());
        }
        fields
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    pub version: Version,
    /// HTTP/2's `:authority` (the Host of HTTP/1 is a header).
    pub authority: Option<String>,
    pub headers: Fields,
    pub body: Body,
    pub first_byte_ns: u64,
    pub last_byte_ns: u64,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// Stands for the response an outgoing request never got: status 0, no headers, no body,
    /// as the SDKs report a failed call.
    pub fn missing_response(at_ns: u64) -> Self {
        Self {
            start: StartLine::Response { status: 0 },
            version: Version::HTTP_1_1,
            authority: None,
            headers: Fields::default(),
            body: Body::default(),
            first_byte_ns: at_ns,
            last_byte_ns: at_ns,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status } => Some(status),
            StartLine::Request { .. } => None,
        }
    }

    /// Heap bytes the message holds.
    pub fn retained_bytes(&self) -> usize {
        let start = match &self.start {
            StartLine::Request { method, target } => method.capacity() + target.capacity(),
            StartLine::Response { .. } => 0,
        };
        start + self.headers.heap_size() + self.body.bytes.capacity()
    }
}

impl Body {
    /// Appends `data`, keeping at most `max_body_bytes` in all (the rest marks it truncated).
    pub fn append(&mut self, data: &[u8], max_body_bytes: usize) {
        let room = max_body_bytes.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::Fields;

    fn pairs(fields: &Fields) -> Vec<(&str, &str)> {
        fields.iter().collect()
    }

    #[test]
    fn get_finds_the_first_value_of_a_name_in_any_case() {
        let fields: Fields = [
            ("Content-Length", "5"),
            ("content-length", "6"),
            ("Content-Type", "text/plain"),
        ]
        .into_iter()
        .collect();
        assert_eq!(fields.get("content-length"), Some("5"));
        assert_eq!(fields.get("CONTENT-TYPE"), Some("text/plain"));
        assert_eq!(fields.get("content"), None);
        assert_eq!(fields.get("content-typo"), None);
    }

    #[test]
    fn fields_from_a_buffer_are_its_parts_and_nothing_of_it_outside_utf8() {
        let buffer = b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
        let part = |from: usize, len: usize| &buffer[from..from + len];
        let parts = [(part(16, 4), part(22, 1)), (part(25, 6), part(33, 3))];
        let fields = Fields::from_buffer(buffer, parts.into_iter()).unwrap();
        assert_eq!(pairs(&fields), [("Host", "a"), ("Accept", "*/*")]);
        assert_eq!(
            fields.text, "Host: a\r\nAccept: */*",
            "from the first name to the last value"
        );

        let invalid = b"X: \xff\r\n";
        assert!(
            Fields::from_buffer(invalid, [(&invalid[..1], &invalid[3..4])].into_iter()).is_none()
        );
        let out_of_order = [(part(25, 6), part(33, 3)), (part(16, 4), part(22, 1))];
        assert!(Fields::from_buffer(buffer, out_of_order.into_iter()).is_none());
        let accented = "X: \u{e9}\r\nY: y".as_bytes();
        let half_a_character = [
            (&accented[..1], &accented[3..4]),
            (&accented[7..8], &accented[10..11]),
        ];
        assert!(Fields::from_buffer(accented, half_a_character.into_iter()).is_none());
        let elsewhere = b"Y";
        assert!(
            Fields::from_buffer(buffer, [(&elsewhere[..], &buffer[..1])].into_iter()).is_none()
        );
    }

    #[test]
    fn sorting_orders_names_bytewise_and_keeps_each_names_values_in_order() {
        let mut fields: Fields = [
            ("content-type", "a"),
            ("Content-Length", "1"),
            ("accept", "x"),
            ("content-length", "2"),
            ("Accept", "y"),
            ("content-type", "b"),
            ("c", "z"),
        ]
        .into_iter()
        .collect();
        fields.sort_by_name();
        assert_eq!(
            pairs(&fields),
            [
                ("Accept", "y"),
                ("Content-Length", "1"),
                ("accept", "x"),
                ("c", "z"),
                ("content-length", "2"),
                ("content-type", "a"),
                ("content-type", "b"),
            ]
        );
    }

    #[test]
    fn replaced_and_dropped_values_are_gone_from_pairs_and_debug() {
        let mut fields: Fields = [
            ("authorization", "Bearer secret-token"),
            ("authorization", "second-secret"),
            ("cookie", "session=dropped"),
            ("accept", "*/*"),
        ]
        .into_iter()
        .collect();
        fields.replace_runs(|name| name == "authorization", "[CLIENT_REDACTED]");
        fields.retain_names(|name| name != "cookie");
        assert_eq!(
            fields.to_pairs(),
            [
                ("authorization".to_owned(), "[CLIENT_REDACTED]".to_owned()),
                ("accept".to_owned(), "*/*".to_owned()),
            ]
        );
        let debug = format!("{fields:?}");
        assert!(debug.contains("[CLIENT_REDACTED]"), "{debug}");
        for gone in ["secret-token", "second-secret", "session=dropped"] {
            assert!(!debug.contains(gone), "{gone} in {debug}");
        }
    }
}
