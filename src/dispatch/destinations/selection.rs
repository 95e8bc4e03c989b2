//! What a claim may take: the event types not held back.

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
