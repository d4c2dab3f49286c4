//! Typed reading of provider JSON that is as forgiving as probing a `serde_json::Value`.
//!
//! The decoders read a handful of fields out of every chunk. Parsing a chunk into a `Value` builds
//! a map and a `String` for every key and value, most of which nobody reads, and that was the
//! largest cost between the provider's bytes and the token's event. These wrappers let a decoder
//! declare the fields it reads as a `#[derive(Deserialize)]` struct (other fields are skipped
//! without being built, strings without escapes are borrowed from the chunk) while keeping the
//! `Value` reading's tolerance: a field of an unexpected JSON type reads as absent instead of
//! failing the chunk.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A string field: absent, null, `""` and non-strings all read as `None` (as `str_field` did).
#[derive(Debug, Default)]
pub(crate) struct Str<'a>(pub Option<Cow<'a, str>>);

impl<'a> Str<'a> {
    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// A number field: absent, null, negative, fractional and non-numbers all read as `None`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Num(pub Option<u64>);

impl Num {
    /// The number, or 0 (as `u64_at` did).
    pub fn or0(self) -> u64 {
        self.0.unwrap_or(0)
    }
}

/// An object field read as `T`; anything else reads as `None`.
#[derive(Debug)]
pub(crate) struct Obj<T>(pub Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

/// An array of objects read as `T`s; elements that are not objects are skipped, and anything
/// but an array reads as empty.
#[derive(Debug)]
pub(crate) struct List<T>(pub Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(Vec::new())
    }
}

/// Whether a field is there and not null (`{"error": …}`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Present(pub bool);

/// A boolean field that counts only when it is JSON `true`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Flag(pub bool);

/// Implements `expecting` and the visitor methods for the JSON types a wrapper does not read: each
/// reads as `$none` (arrays and objects are skipped through).
macro_rules! otherwise {
    ($none:expr; $($kind:ident)*) => {
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        $(otherwise!(@$kind $none);)*
    };
    (@bool $none:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@i64 $none:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@u64 $none:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@f64 $none:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@str $none:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@null $none:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
    (@seq $none:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
    (@map $none:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Str((!s.is_empty()).then_some(Cow::Borrowed(s))))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Str((!s.is_empty()).then(|| Cow::Owned(s.to_string()))))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Str((!s.is_empty()).then_some(Cow::Owned(s))))
            }
            otherwise!(Str(None); bool i64 u64 f64 null seq map);
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Num;
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Num(Some(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(Num(u64::try_from(n).ok()))
            }
            otherwise!(Num(None); bool f64 str null seq map);
        }
        d.deserialize_any(V)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            otherwise!(Obj(None); bool i64 u64 f64 str null seq);
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(Obj(item)) = seq.next_element::<Obj<T>>()? {
                    items.extend(item);
                }
                Ok(List(items))
            }
            otherwise!(List(Vec::new()); bool i64 u64 f64 str null map);
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flag;
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(Flag(b))
            }
            otherwise!(Flag(false); i64 u64 f64 str null seq map);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Option::<IgnoredAny>::deserialize(d)?;
        Ok(Present(value.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(default, borrow)]
        s: Str<'a>,
        #[serde(default)]
        n: Num,
        #[serde(default)]
        o: Obj<Inner>,
        #[serde(default)]
        l: List<Inner>,
        #[serde(default)]
        e: Present,
    }

    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        n: Num,
    }

    fn probe(json: &str) -> Probe<'_> {
        match serde_json::from_str(json) {
            Ok(p) => p,
            Err(e) => panic!("{json} was refused: {e}"),
        }
    }

    #[test]
    fn fields_of_the_expected_type_are_read() {
        let p = probe(r#"{"s":"hi","n":7,"o":{"n":1},"l":[{"n":2},{"n":3}],"e":{"x":1}}"#);
        assert_eq!(p.s.get(), Some("hi"));
        assert!(
            matches!(p.s.0, Some(Cow::Borrowed(_))),
            "unescaped text is borrowed"
        );
        assert_eq!(p.n.0, Some(7));
        assert_eq!(p.o.0.map(|i| i.n.or0()), Some(1));
        assert_eq!(p.l.0.iter().map(|i| i.n.or0()).collect::<Vec<_>>(), [2, 3]);
        assert!(p.e.0);
        let escaped = probe(r#"{"s":"a\"b\u00e9"}"#);
        assert_eq!(escaped.s.get(), Some("a\"bé"));
    }

    #[test]
    fn absent_null_empty_and_other_types_read_as_absent() {
        let p = probe("{}");
        assert!(p.s.get().is_none() && p.n.0.is_none() && p.o.0.is_none());
        assert!(p.l.0.is_empty() && !p.e.0);
        let p = probe(r#"{"s":null,"n":null,"o":null,"l":null,"e":null}"#);
        assert!(p.s.get().is_none() && p.n.0.is_none() && p.o.0.is_none());
        assert!(p.l.0.is_empty() && !p.e.0);
        let p = probe(r#"{"s":"","n":-1,"o":[1,{"n":1}],"l":{"n":1}}"#);
        assert!(p.s.get().is_none() && p.n.0.is_none() && p.o.0.is_none());
        assert!(p.l.0.is_empty());
        let p = probe(r#"{"s":{"deep":[1,{"x":[]}]},"n":"7","o":"x","l":[1,"a",{"n":4},null]}"#);
        assert!(p.s.get().is_none() && p.n.0.is_none() && p.o.0.is_none());
        assert_eq!(p.l.0.iter().map(|i| i.n.or0()).collect::<Vec<_>>(), [4]);
        let p = probe(r#"{"s":true,"n":1.5,"o":false,"l":2.5}"#);
        assert!(p.s.get().is_none() && p.n.0.is_none() && p.o.0.is_none());
    }

    #[test]
    fn broken_json_is_still_an_error() {
        for bad in [r#"{"s":"x""#, r#"{"l":[{"n":1}"#, "[", r#"{"s":"\ud800"}"#] {
            assert!(
                serde_json::from_str::<Probe>(bad).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
