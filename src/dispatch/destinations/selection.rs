//! What a claim may take: the event types not held back.

use super::Destinations;
use crate::store::sealed::TypeFilter;

/// Which event types to look at: those in `only` (all when `None`), minus
/// those in `skip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selection {
    pub(crate) only: Option<Vec<String>>,
    pub(crate) skip: Vec<String>,
}

impl Selection {
    /// True if no type at all can be claimed (every destination is held
    /// back): then there is nothing to look for until a probe or a resume.
    pub(crate) fn is_empty(&self) -> bool {
        self.only.as_ref().is_some_and(Vec::is_empty)
    }

    pub(crate) fn filter(&self) -> TypeFilter<'_> {
        TypeFilter {
            only: self.only.as_deref(),
            skip: &self.skip,
        }
    }
}

/// Which types go where, and so which a claim may take.
impl Destinations {
    /// The event types that go to `destination`, out of `mine` (the
    /// dispatcher's types; all when `None`). `None` means every type of
    /// `mine` not routed elsewhere: the default destination's.
    pub(crate) fn types_of(
        &self,
        destination: &str,
        mine: Option<&[String]>,
    ) -> Option<Vec<String>> {
        if self.is_default(destination) {
            return mine.map(|m| {
                m.iter()
                    .filter(|t| !self.routes.contains_key(*t))
                    .cloned()
                    .collect()
            });
        }
        let mut types: Vec<String> = self
            .routes
            .iter()
            .filter(|(_, d)| d.as_str() == destination)
            .map(|(t, _)| t.clone())
            .collect();
        if self.default.is_none() && !self.routes.contains_key(destination) {
            types.push(destination.to_owned());
        }
        if let Some(mine) = mine {
            types.retain(|t| mine.contains(t));
        }
        types.sort();
        Some(types)
    }

    /// What to claim now, out of `mine`: every type whose destination is
    /// not held back.
    pub(crate) fn claimable(&self, mine: Option<&[String]>) -> Selection {
        self.claimable_without(mine, &[])
    }

    /// As [`Destinations::claimable`], leaving out the destinations
    /// `also` as well (those a limit claims on their own).
    pub(crate) fn claimable_without(&self, mine: Option<&[String]>, also: &[String]) -> Selection {
        let mut held: Vec<String> = self.held().keys().cloned().collect();
        held.extend(also.iter().cloned());
        let mut skip: Vec<String> = held
            .iter()
            .filter(|d| !self.is_default(d))
            .filter_map(|d| self.types_of(d, None))
            .flatten()
            .collect();
        skip.sort();
        skip.dedup();
        let only = if held.iter().any(|d| self.is_default(d)) {
            // The default destination covers every type not routed: only
            // routed types to destinations still open remain.
            let mut open: Vec<String> = self
                .routes
                .iter()
                .filter(|(t, d)| !held.contains(d) && mine.is_none_or(|m| m.contains(t)))
                .map(|(t, _)| t.clone())
                .collect();
            open.sort();
            Some(open)
        } else {
            mine.map(<[String]>::to_vec)
        };
        match only {
            // A list of types to claim needs no list to skip.
            Some(mut only) => {
                only.retain(|t| !skip.contains(t));
                Selection {
                    only: Some(only),
                    skip: Vec::new(),
                }
            }
            None => Selection { only: None, skip },
        }
    }

    /// What a probe of `destination` may claim, out of `mine`.
    pub(crate) fn probe_selection(&self, destination: &str, mine: Option<&[String]>) -> Selection {
        if self.is_default(destination) {
            let mut skip: Vec<String> = self.routes.keys().cloned().collect();
            skip.sort();
            Selection {
                only: mine.map(<[String]>::to_vec),
                skip,
            }
        } else {
            Selection {
                only: self.types_of(destination, mine),
                skip: Vec::new(),
            }
        }
    }
}
