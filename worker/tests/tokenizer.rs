//! The GGUF tokenizer on the real test model: ids against llama.cpp's for a set of strings,
//! round trips, special tokens, digits, and the ChatML template.
//!
//! Reference ids come from llama.cpp (llama-cpp-python 0.3.36, `Llama.tokenize(text,
//! add_bos=False, special=...)`) on models/SmolLM2-135M-Instruct.Q4_1.gguf; docs/worker.md
//! has the script.

mod common;

use proptest::prelude::*;
use tessera_worker::model::MappedGguf;
use tessera_worker::tokenizer::{Message, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static T: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let m = MappedGguf::open(&common::model_path()).expect("model parses");
        Tokenizer::from_gguf(&m.gguf).expect("tokenizer builds")
    })
}

/// (text, ids with special tokens parsed, ids with special tokens as plain text), from llama.cpp.
#[rustfmt::skip]
const LLAMA_CPP: &[(&str, &[u32], &[u32])] = &[
    ("Hello world", &[19556, 905], &[19556, 905]),
    ("What is the capital of France?", &[1780, 314, 260, 3575, 282, 4649, 47], &[1780, 314, 260, 3575, 282, 4649, 47]),
    ("  leading spaces and trailing   ", &[216, 2899, 5600, 284, 35079, 333], &[216, 2899, 5600, 284, 35079, 333]),
    ("I'm sure they'll say it's fine, we've done it'd seem", &[57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 28, 392, 3543, 2294, 357, 6737, 2395], &[57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 28, 392, 3543, 2294, 357, 6737, 2395]),
    ("Numbers: 1234567 and 3.14159, year 2024!", &[39006, 42, 216, 33, 34, 35, 36, 37, 38, 39, 284, 216, 35, 30, 33, 36, 33, 37, 41, 28, 713, 216, 34, 32, 34, 36, 17], &[39006, 42, 216, 33, 34, 35, 36, 37, 38, 39, 284, 216, 35, 30, 33, 36, 33, 37, 41, 28, 713, 216, 34, 32, 34, 36, 17]),
    ("line one\nline two\n\n\tindented\r\n", &[1311, 582, 198, 1311, 827, 1116, 197, 526, 6574, 2738], &[1311, 582, 198, 1311, 827, 1116, 197, 526, 6574, 2738]),
    ("Ünïcödé café naïve résumé, Straße, Ελληνικά, русский", &[142, 246, 94, 25972, 83, 7466, 84, 2756, 37366, 15486, 46494, 412, 2756, 5422, 2756, 28, 19144, 34878, 85, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 216, 9175, 14714, 9382, 39511, 7872, 24958], &[142, 246, 94, 25972, 83, 7466, 84, 2756, 37366, 15486, 46494, 412, 2756, 5422, 2756, 28, 19144, 34878, 85, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 216, 9175, 14714, 9382, 39511, 7872, 24958]),
    ("中文字符和日本語のテキスト", &[28589, 29184, 36518, 40562, 116, 42179, 23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226], &[28589, 29184, 36518, 40562, 116, 42179, 23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226]),
    ("emoji 🎉🚀 and symbols ©®™ ±×÷", &[391, 33777, 15107, 232, 227, 10813, 244, 218, 284, 7349, 11435, 10532, 14824, 17004, 20628, 142, 132], &[391, 33777, 15107, 232, 227, 10813, 244, 218, 284, 7349, 11435, 10532, 14824, 17004, 20628, 142, 132]),
    ("fn main() { println!(\"{}\", x + 1); } // code", &[7853, 1085, 1000, 1662, 1628, 34115, 17, 43331, 1002, 1792, 1232, 216, 33, 4258, 4029, 13241, 2909], &[7853, 1085, 1000, 1662, 1628, 34115, 17, 43331, 1002, 1792, 1232, 216, 33, 4258, 4029, 13241, 2909]),
    ("    def f(x):\n        return x**2", &[333, 753, 275, 24, 104, 727, 448, 1003, 1792, 828, 34], &[333, 753, 275, 24, 104, 727, 448, 1003, 1792, 828, 34]),
    ("<|im_start|>user\nhi<|im_end|>\n", &[1, 4093, 198, 6004, 2, 198], &[44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46, 198]),
    ("a  b   c    d", &[81, 216, 278, 256, 265, 333, 287], &[81, 216, 278, 256, 265, 333, 287]),
    ("HTTP/1.1 200 OK; e-mail: a.b@c.de; $100.00 (50%)", &[23432, 31, 33, 30, 33, 216, 34, 32, 32, 15310, 43, 297, 29, 8925, 42, 253, 30, 82, 48, 83, 30, 1018, 43, 1885, 33, 32, 32, 30, 32, 32, 365, 37, 32, 8402], &[23432, 31, 33, 30, 33, 216, 34, 32, 32, 15310, 43, 297, 29, 8925, 42, 253, 30, 82, 48, 83, 30, 1018, 43, 1885, 33, 32, 32, 30, 32, 32, 365, 37, 32, 8402]),
];

#[test]
fn ids_match_llama_cpp() {
    let t = tokenizer();
    for (text, special, plain) in LLAMA_CPP {
        assert_eq!(&t.encode(text, true), special, "special=true: {text:?}");
        assert_eq!(&t.encode(text, false), plain, "special=false: {text:?}");
    }
}

#[test]
fn decode_inverts_encode_on_the_reference_strings() {
    let t = tokenizer();
    for (text, _, plain) in LLAMA_CPP {
        assert_eq!(t.decode(plain, false), *text);
        assert_eq!(t.decode(&t.encode(text, true), false), *text);
    }
}

#[test]
fn special_tokens_and_digits() {
    let t = tokenizer();
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.eos, Some(2));
    assert!(t.is_stop(2));
    assert!(!t.add_bos);
    assert_eq!(t.encode("<|im_start|><|im_end|>", true), vec![1, 2]);
    // Digits are split one by one: "2024" is four tokens, each the digit's own token.
    let ids = t.encode("2024", false);
    assert_eq!(ids.len(), 4);
    for (id, d) in ids.iter().zip(["2", "0", "2", "4"]) {
        assert_eq!(t.token(*id), Some(d));
    }
    // Control tokens are dropped when decoding for display.
    assert_eq!(t.decode(&[1, 4093, 198, 2], true), "user\n");
}

#[test]
fn chatml_template() {
    let t = tokenizer();
    let s = t
        .apply_chat_template(
            &[Message::new("user", "What is the capital of France?")],
            true,
        )
        .expect("chatml");
    assert_eq!(
        s,
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.encode(&s, true),
        [
            1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198
        ]
    );
    let with_system = t
        .apply_chat_template(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            false,
        )
        .expect("chatml");
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    assert_eq!(
        t.default_system_prompt().as_deref(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip_of_any_text(s in "\\PC{0,40}") {
        let t = tokenizer();
        let ids = t.encode(&s, false);
        prop_assert_eq!(t.decode(&ids, false), s);
    }
}

/// Run `f` on a thread and fail if it has not finished in `secs` seconds (a hang guard for
/// inputs that used to take hours, not a speed target: speed is in scripts/bench-tokenizer.sh).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: not tokenised within {secs} s"))
}

/// Hostile inputs of 1 MiB: one word (the BPE merge loop rescanned every pair after each merge,
/// so an 80,000-character word took 42 s and 1 MiB would take hours), one repeated letter,
/// repeated special tokens (each match rescanned the rest of the text for every special token),
/// random characters. Each must round-trip and give the token count its structure implies.
#[test]
fn hostile_megabyte_inputs_are_tokenised_and_round_trip() {
    let n = 1 << 20;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let word: String = (0..n)
        .map(|_| char::from(b'a' + (next() % 26) as u8))
        .collect();
    let same = "a".repeat(n);
    let specials = "<|im_start|><|im_end|>".repeat(n / 22);
    let pool = ['x', 'é', '中', '😀', ' ', '\n', '7', '\u{301}', '\t', '.'];
    let chars: String = (0..n / 3)
        .map(|_| pool[(next() % pool.len() as u64) as usize])
        .collect();
    for (name, text) in [
        ("one word", word),
        ("one letter", same),
        ("special tokens", specials),
        ("random characters", chars),
    ] {
        let t = tokenizer();
        let (ids, back) = within(60, name, move || {
            let ids = t.encode(&text, true);
            let back = t.decode(&ids, false);
            (ids, back == text)
        });
        assert!(back, "{name}: decode(encode(text)) differs from the text");
        assert!(!ids.is_empty(), "{name}");
        if name == "special tokens" {
            assert_eq!(ids.len(), 2 * (n / 22), "{name}: one id per special token");
            assert!(ids.iter().all(|&i| i == 1 || i == 2));
        }
    }
}

/// An 80,000-character word (the reproduction of the worker-hardening issue: 42 s of CPU before)
/// is one pre-tokenizer piece; it round-trips, and merges happened all along it.
#[test]
fn an_80000_character_word_is_tokenised_whole() {
    let t = tokenizer();
    let unit = "antidisestablishmentarianism";
    let word = unit.repeat(80_000 / unit.len());
    let w = word.clone();
    let ids = within(60, "80,000-character word", move || t.encode(&w, false));
    assert_eq!(t.decode(&ids, false), word);
    // Far fewer tokens than characters: merges happened across the whole word.
    assert!(ids.len() < 80_000 / 3, "{} tokens", ids.len());
}

/// Bytes the vocabulary has no token for (SmolLM2 lacks some control bytes) are dropped, as
/// llama.cpp drops them, but still separate their neighbours: `<\x14<` is not `<<`, and
/// ` \x06🩎` does not merge the space into the emoji's bytes. Found by comparing 5,000 random
/// strings with llama.cpp (`scripts/bench-tokenizer.sh` inputs); ids from llama-cpp-python 0.3.36.
#[test]
fn bytes_without_a_token_separate_their_neighbours_like_llama_cpp() {
    let t = tokenizer();
    let cases: [(&str, &[u32]); 2] = [
        (
            "Ż7🞧\u{1f8b4}<\u{14}<\u{35e}",
            &[
                144, 136, 39, 10813, 248, 117, 10813, 112, 129, 44, 44, 152, 248,
            ],
        ),
        (
            "\u{13}ƪ栎7 \u{6}🩎🚈",
            &[
                145, 120, 26519, 232, 39, 216, 10813, 119, 232, 10813, 244, 226,
            ],
        ),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode(text, true), ids, "{text:?}");
    }
}
