//! What decoding a protobuf body will cost in memory, known before it is
//! decoded.
//!
//! `prost` allocates a struct for every sub-message it reads, and an empty
//! sub-message is two bytes on the wire: an OTLP body of empty log records
//! would become a hundred times its size in memory. Before a body of the
//! stock agent APIs (OTLP, Loki) is handed to `prost`, [`decoded_bytes`]
//! walks its wire format along the message's [`Shape`] (which fields hold
//! which sub-messages) and adds up an upper bound of what the decode will
//! allocate; the handler reserves that much of the in-flight budget first.
//! The walk reads each byte once, allocates nothing and refuses what
//! `prost` would refuse as malformed (truncated fields, bad wire types,
//! nesting deeper than its limit).

/// The memory layout of a message type, for [`decoded_bytes`].
#[derive(Debug)]
pub struct Shape {
    /// `size_of` the Rust type a field of this shape decodes into.
    pub size: usize,
    /// The fields of this message that hold sub-messages (or strings kept
    /// in a `Vec`), by field number.
    pub children: &'static [(u32, &'static Shape)],
    /// A string or bytes value rather than a message: its bytes are not
    /// walked.
    pub leaf: bool,
}

impl Shape {
    /// A message type.
    pub const fn message<T>(children: &'static [(u32, &'static Shape)]) -> Shape {
        Shape {
            size: size_of::<T>(),
            children,
            leaf: false,
        }
    }

    /// An element of a repeated `string` or `bytes` field.
    pub const fn repeated_string() -> Shape {
        Shape {
            size: size_of::<String>(),
            children: &[],
            leaf: true,
        }
    }

    fn child(&self, field: u64) -> Option<&'static Shape> {
        self.children
            .iter()
            .find(|(f, _)| u64::from(*f) == field)
            .map(|(_, s)| *s)
    }
}

/// Nesting `prost` accepts (its recursion limit).
const MAX_DEPTH: u32 = 100;

/// Per allocation, beyond the bytes asked for (allocator rounding).
const ALLOCATION_SLACK: u64 = 16;

/// A body that is not a protobuf encoding of its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// An upper bound of the bytes `prost` allocates to decode `buf` as a
/// message of `shape`: each sub-message counts four times its struct (a
/// `Vec` holds up to four elements' room for one, and up to twice what it
/// holds once it grows), each string or bytes field its length.
pub fn decoded_bytes(buf: &[u8], shape: &Shape) -> Result<u64, Malformed> {
    Ok(shape.size as u64 + walk(buf, shape, 0)?)
}

fn walk(mut buf: &[u8], shape: &Shape, depth: u32) -> Result<u64, Malformed> {
    if depth >= MAX_DEPTH {
        return Err(Malformed("messages nested deeper than 100 levels"));
    }
    let mut total = 0u64;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = key >> 3;
        if field == 0 {
            return Err(Malformed("a field numbered 0"));
        }
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = skip(buf, 8)?,
            5 => buf = skip(buf, 4)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?)
                    .map_err(|_| Malformed("a field longer than the body"))?;
                if len > buf.len() {
                    return Err(Malformed("a field longer than the body"));
                }
                let (value, rest) = buf.split_at(len);
                buf = rest;
                total += len as u64 + ALLOCATION_SLACK;
                if let Some(child) = shape.child(field) {
                    total += 4 * child.size as u64;
                    if !child.leaf {
                        total += walk(value, child, depth + 1)?;
                    }
                }
            }
            _ => return Err(Malformed("a field of an unknown or group wire type")),
        }
    }
    Ok(total)
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], Malformed> {
    buf.get(n..).ok_or(Malformed("a truncated field"))
}

#[inline]
fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    // Most varints of a log record (keys, lengths, small numbers) are one
    // byte.
    if let Some((&b, rest)) = buf.split_first()
        && b < 0x80
    {
        *buf = rest;
        return Ok(u64::from(b));
    }
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(Malformed("a truncated varint"));
        };
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err(Malformed("a varint longer than 10 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    struct Outer {
        #[prost(message, repeated, tag = "1")]
        inner: Vec<Inner>,
        #[prost(string, tag = "2")]
        name: String,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Inner {
        #[prost(message, repeated, tag = "1")]
        nested: Vec<Inner>,
        #[prost(string, repeated, tag = "2")]
        tags: Vec<String>,
        #[prost(fixed64, tag = "3")]
        at: u64,
    }

    static OUTER: Shape = Shape::message::<Outer>(&[(1, &INNER)]);
    static INNER: Shape = Shape::message::<Inner>(&[(1, &INNER), (2, &TAG)]);
    static TAG: Shape = Shape::repeated_string();

    /// What the decoded message holds on the heap, at least.
    fn heap(o: &Outer) -> u64 {
        fn inner(i: &Inner) -> u64 {
            (i.nested.capacity() * size_of::<Inner>()) as u64
                + i.nested.iter().map(inner).sum::<u64>()
                + (i.tags.capacity() * size_of::<String>()) as u64
                + i.tags.iter().map(|t| t.capacity() as u64).sum::<u64>()
        }
        (size_of::<Outer>() + o.inner.capacity() * size_of::<Inner>() + o.name.capacity()) as u64
            + o.inner.iter().map(inner).sum::<u64>()
    }

    #[test]
    fn the_bound_covers_what_prost_allocates() {
        let empty = Inner::default();
        let deep = (0..50).fold(Inner::default(), |acc, _| Inner {
            nested: vec![acc],
            ..Default::default()
        });
        let tagged = Inner {
            tags: vec![String::new(); 1000],
            at: 7,
            ..Default::default()
        };
        for msg in [
            Outer::default(),
            Outer {
                inner: vec![empty.clone(); 10_000],
                name: "x".into(),
            },
            Outer {
                inner: vec![deep, tagged, empty],
                name: "y".repeat(100),
            },
        ] {
            let wire = msg.encode_to_vec();
            let bound = decoded_bytes(&wire, &OUTER).unwrap();
            let decoded = Outer::decode(wire.as_slice()).unwrap();
            let held = heap(&decoded);
            assert!(bound >= held, "{bound} < {held}");
            // Not so loose that it refuses what fits: empty messages are
            // the worst case, and cost about 100 times their wire size.
            assert!(bound <= 8 * held + 4 * wire.len() as u64 + 1000);
        }
    }

    #[test]
    fn what_prost_refuses_the_walk_refuses() {
        let good = Outer {
            inner: vec![Inner::default()],
            name: "n".into(),
        }
        .encode_to_vec();
        for bad in [
            &good[..good.len() - 1],
            &[0x0a, 0x05, 0x00][..],
            &[0x08][..],
            &[0x0b][..],
            &[0x00, 0x00][..],
            &[0xff; 11][..],
        ] {
            assert!(Outer::decode(bad).is_err(), "{bad:?}");
            assert!(decoded_bytes(bad, &OUTER).is_err(), "{bad:?}");
        }
        // Nested beyond prost's limit: both refuse.
        let mut deep = Vec::new();
        for _ in 0..120 {
            let mut outer = vec![0x0a];
            let mut len = Vec::new();
            prost::encoding::encode_varint(deep.len() as u64, &mut len);
            outer.extend(len);
            outer.extend(deep);
            deep = outer;
        }
        assert!(Outer::decode(deep.as_slice()).is_err());
        assert!(decoded_bytes(&deep, &OUTER).is_err());
    }
}
