//! Stop strings over streamed text: text is released only once it can no longer be the start
//! of a stop string, so a stop string is never split across two streamed chunks nor leaked.

/// Watches generated text for stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds new text. Returns the text that is safe to emit, and whether a stop string ended
    /// generation (the stop string itself and anything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Longest suffix of `held` that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > keep && self.held.ends_with(&s[..k]) {
                    keep = k;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Releases held text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn holds_back_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc S"), ("abc ".to_string(), false));
        assert_eq!(m.push("T"), (String::new(), false));
        assert_eq!(m.push("x"), ("STx".to_string(), false));
        assert_eq!(m.push("yy ST"), ("yy ".to_string(), false));
        assert_eq!(m.push("OP tail"), (String::new(), true));
    }

    proptest! {
        #[test]
        fn streamed_equals_whole_text_cut_at_first_stop(text in "[ab ]{0,40}", stop in "[ab]{1,3}", cuts in proptest::collection::vec(0usize..40, 0..8)) {
            let mut m = StopMatcher::new(vec![stop.clone()]);
            let mut pieces = vec![];
            let mut last = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= text.len()).collect();
            cuts.sort();
            cuts.push(text.len());
            let mut out = String::new();
            let mut stopped = false;
            for c in cuts {
                pieces.push(&text[last..c]);
                let (o, s) = m.push(&text[last..c]);
                prop_assert!(!o.contains(&stop));
                out.push_str(&o);
                last = c;
                if s { stopped = true; break; }
            }
            if !stopped { out.push_str(&m.flush()); }
            let want = match text.find(&stop) { Some(i) => &text[..i], None => &text[..] };
            prop_assert_eq!(out, want);
            prop_assert_eq!(stopped, text.contains(&stop));
        }
    }
}
