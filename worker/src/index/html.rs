//! HTML to the text a reader reads: the page's title, its main content as
//! paragraphs and lines, its headings as structure, its tables as rows of
//! cell text separated by ` | `.
//!
//! ## Parser
//!
//! html5ever (the WHATWG parsing algorithm, Servo's) into a compact arena
//! of our own ([`Dom`]), not `scraper`/`markup5ever_rcdom`, `tl` or
//! `lol_html`:
//! - html5ever was already compiled into the worker (html2text used it), so
//!   the parser costs no build time; `scraper` adds `selectors`, `cssparser`
//!   and `ego-tree` for CSS selectors we need a dozen of, written as code.
//! - real pages are tag soup (implied `tbody`, unclosed `p`, misnested
//!   formatting): a spec-compliant tree builder gets them as a browser does,
//!   which `tl` (a fast non-validating parser) does not;
//!   `lol_html` streams without a tree, and choosing the main content needs
//!   one (link density of a block, "is there a `main`").
//! - the arena holds indices, not reference-counted nodes: no recursive
//!   drop on deeply nested input, ~70 bytes a node, and the walk over it is
//!   iterative. The parse stops feeding input once the tree holds
//!   [`MAX_NODES`] nodes or nests deeper than [`MAX_DEPTH`] (the tree
//!   builder's scope checks walk the open-element stack: unbounded nesting
//!   would make it quadratic); what was read up to there is extracted and
//!   the document is marked truncated.
//!
//! ## What is kept
//!
//! The main content is the outermost `main` elements, else `[role=main]`,
//! else `article`, else Sphinx's `div.body`, else DocBook's division
//! elements (`div.sect1`, `div.chapter`, `div.refentry`, …: the PostgreSQL
//! manual); when none exists, the whole `body` with link-dense blocks
//! (navigation menus, link lists: most of their text in links) dropped.
//! Everywhere: `script`, `style`, `nav`, `aside`, `footer`, `form`,
//! page-level `header` (one without a heading), `[role=navigation]`,
//! `[aria-hidden=true]`, DocBook's `navheader`/`navfooter`/`toc` and
//! Sphinx's sidebars and `related` bars are dropped, and so are permalink
//! anchors (`¶`, `#`, `headerlink`). Link text stays, link syntax goes.
//! Whitespace is collapsed except in `pre`. The text is bounded: never more
//! than the input's size plus [`SLACK`] bytes, and never more than
//! [`MAX_TEXT_BYTES`].

use std::borrow::Cow;
use std::cell::{Cell, RefCell};

use html5ever::interface::{ElementFlags, NodeOrText, QuirksMode, TreeSink};
use html5ever::tendril::{StrTendril, TendrilSink};
use html5ever::{Attribute, LocalName, QualName, local_name, ns, parse_document};

/// Nodes a page may have before the parse stops (the text read until then
/// is kept).
pub const MAX_NODES: usize = 400_000;
/// Element nesting at which the parse stops.
pub const MAX_DEPTH: usize = 256;
/// Text never exceeds the input by more than this (separators, breaks).
pub const SLACK: usize = 1024;
/// Text of one page never exceeds this.
pub const MAX_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// Longest title and heading kept, in bytes.
const MAX_LABEL_BYTES: usize = 300;

/// A heading of the extracted text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heading {
    /// Byte offset of the heading's text in the extracted text.
    pub offset: usize,
    /// 1 (`h1`) to 6.
    pub level: u8,
    pub text: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub title: Option<String>,
    pub text: String,
    pub headings: Vec<Heading>,
    /// Cut short by a limit (nodes, depth, text size).
    pub truncated: bool,
}

/// Parses `html` and extracts its main content.
pub fn extract(html: &str) -> Page {
    extract_decoded(html, html.len())
}

/// [`extract`] of a page decoded from `input_bytes` bytes: the text stays
/// within those plus [`SLACK`] even where decoding made it longer (each
/// invalid byte becomes a 3-byte replacement character).
pub fn extract_decoded(html: &str, input_bytes: usize) -> Page {
    let dom = parse(html);
    let limit = input_bytes.saturating_add(SLACK).min(MAX_TEXT_BYTES);
    let mut page = render(&dom, limit);
    page.truncated |= dom.truncated;
    page
}

// ---------------------------------------------------------------- the arena

const NONE: u32 = u32::MAX;

#[derive(Debug)]
enum Data {
    Document,
    Element {
        name: QualName,
        /// Only the attributes extraction looks at.
        attrs: Vec<(LocalName, StrTendril)>,
        template: u32,
    },
    Text(StrTendril),
    Other,
}

#[derive(Debug)]
struct Node {
    parent: u32,
    first: u32,
    last: u32,
    prev: u32,
    next: u32,
    depth: u32,
    data: Data,
}

impl Node {
    fn new(data: Data) -> Node {
        Node {
            parent: NONE,
            first: NONE,
            last: NONE,
            prev: NONE,
            next: NONE,
            depth: 0,
            data,
        }
    }
}

/// A parsed page.
struct Dom {
    nodes: Vec<Node>,
    truncated: bool,
}

impl Dom {
    fn children(&self, id: u32) -> Children<'_> {
        Children {
            dom: self,
            next: self.nodes[id as usize].first,
        }
    }

    fn local(&self, id: u32) -> Option<&LocalName> {
        match &self.nodes[id as usize].data {
            Data::Element { name, .. } => Some(&name.local),
            _ => None,
        }
    }

    fn attr(&self, id: u32, key: &LocalName) -> Option<&str> {
        match &self.nodes[id as usize].data {
            Data::Element { attrs, .. } => attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_ref()),
            _ => None,
        }
    }

    fn has_class(&self, id: u32, class: &str) -> bool {
        self.attr(id, &local_name!("class"))
            .is_some_and(|c| c.split_ascii_whitespace().any(|t| t == class))
    }
}

struct Children<'a> {
    dom: &'a Dom,
    next: u32,
}

impl Iterator for Children<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.next == NONE {
            return None;
        }
        let id = self.next;
        self.next = self.dom.nodes[id as usize].next;
        Some(id)
    }
}

/// A node of the arena as the tree builder holds it: its index, and its
/// name when it is an element (the builder asks for names by reference).
#[derive(Clone, Debug)]
struct Handle {
    id: u32,
    name: QualName,
}

fn no_name() -> QualName {
    QualName::new(None, ns!(), local_name!(""))
}

const KEPT_ATTRS: [LocalName; 5] = [
    local_name!("class"),
    local_name!("id"),
    local_name!("role"),
    local_name!("aria-hidden"),
    local_name!("hidden"),
];

struct Sink {
    nodes: RefCell<Vec<Node>>,
    /// Set when a limit is reached: the driver stops feeding input.
    stop: Cell<bool>,
}

impl Sink {
    fn push(&self, data: Data) -> u32 {
        let mut nodes = self.nodes.borrow_mut();
        if nodes.len() >= MAX_NODES {
            self.stop.set(true);
        }
        let id = u32::try_from(nodes.len()).unwrap_or(NONE - 1);
        nodes.push(Node::new(data));
        id
    }

    fn handle(&self, id: u32) -> Handle {
        Handle {
            id,
            name: no_name(),
        }
    }
}

fn detach(nodes: &mut [Node], id: u32) {
    let (parent, prev, next) = {
        let n = &nodes[id as usize];
        (n.parent, n.prev, n.next)
    };
    if parent == NONE {
        return;
    }
    if prev == NONE {
        nodes[parent as usize].first = next;
    } else {
        nodes[prev as usize].next = next;
    }
    if next == NONE {
        nodes[parent as usize].last = prev;
    } else {
        nodes[next as usize].prev = prev;
    }
    let n = &mut nodes[id as usize];
    n.parent = NONE;
    n.prev = NONE;
    n.next = NONE;
}

/// Links `id` (detached) as the last child of `parent`.
fn link_last(nodes: &mut [Node], parent: u32, id: u32) -> u32 {
    let last = nodes[parent as usize].last;
    let depth = nodes[parent as usize].depth.saturating_add(1);
    {
        let n = &mut nodes[id as usize];
        n.parent = parent;
        n.prev = last;
        n.next = NONE;
        n.depth = depth;
    }
    if last == NONE {
        nodes[parent as usize].first = id;
    } else {
        nodes[last as usize].next = id;
    }
    nodes[parent as usize].last = id;
    depth
}

/// Links `id` (detached) just before `sibling`.
fn link_before(nodes: &mut [Node], sibling: u32, id: u32) -> u32 {
    let (parent, prev) = {
        let s = &nodes[sibling as usize];
        (s.parent, s.prev)
    };
    let depth = nodes[sibling as usize].depth;
    {
        let n = &mut nodes[id as usize];
        n.parent = parent;
        n.prev = prev;
        n.next = sibling;
        n.depth = depth;
    }
    nodes[sibling as usize].prev = id;
    if prev == NONE {
        if parent != NONE {
            nodes[parent as usize].first = id;
        }
    } else {
        nodes[prev as usize].next = id;
    }
    depth
}

impl TreeSink for Sink {
    type Handle = Handle;
    type Output = Dom;
    type ElemName<'a> = &'a QualName;

    fn finish(self) -> Dom {
        Dom {
            nodes: self.nodes.into_inner(),
            truncated: self.stop.get(),
        }
    }

    fn parse_error(&self, _msg: Cow<'static, str>) {}

    fn get_document(&self) -> Handle {
        self.handle(0)
    }

    fn elem_name<'a>(&'a self, target: &'a Handle) -> &'a QualName {
        &target.name
    }

    fn create_element(&self, name: QualName, attrs: Vec<Attribute>, flags: ElementFlags) -> Handle {
        let template = if flags.template {
            self.push(Data::Document)
        } else {
            NONE
        };
        let attrs = attrs
            .into_iter()
            .filter(|a| KEPT_ATTRS.contains(&a.name.local))
            .map(|a| (a.name.local, a.value))
            .collect();
        let id = self.push(Data::Element {
            name: name.clone(),
            attrs,
            template,
        });
        Handle { id, name }
    }

    fn create_comment(&self, _text: StrTendril) -> Handle {
        self.handle(self.push(Data::Other))
    }

    fn create_pi(&self, _target: StrTendril, _data: StrTendril) -> Handle {
        self.handle(self.push(Data::Other))
    }

    fn append(&self, parent: &Handle, child: NodeOrText<Handle>) {
        let mut nodes = self.nodes.borrow_mut();
        let depth = match child {
            NodeOrText::AppendNode(h) => {
                detach(&mut nodes, h.id);
                link_last(&mut nodes, parent.id, h.id)
            }
            NodeOrText::AppendText(t) => {
                let last = nodes[parent.id as usize].last;
                if last != NONE
                    && let Data::Text(existing) = &mut nodes[last as usize].data
                {
                    existing.push_tendril(&t);
                    return;
                }
                drop(nodes);
                let id = self.push(Data::Text(t));
                let mut nodes = self.nodes.borrow_mut();
                link_last(&mut nodes, parent.id, id)
            }
        };
        if depth as usize > MAX_DEPTH {
            self.stop.set(true);
        }
    }

    fn append_based_on_parent_node(
        &self,
        element: &Handle,
        prev_element: &Handle,
        child: NodeOrText<Handle>,
    ) {
        let has_parent = self.nodes.borrow()[element.id as usize].parent != NONE;
        if has_parent {
            self.append_before_sibling(element, child);
        } else {
            self.append(prev_element, child);
        }
    }

    fn append_doctype_to_document(&self, _: StrTendril, _: StrTendril, _: StrTendril) {}

    fn get_template_contents(&self, target: &Handle) -> Handle {
        let nodes = self.nodes.borrow();
        let id = match &nodes[target.id as usize].data {
            Data::Element { template, .. } if *template != NONE => *template,
            _ => target.id,
        };
        self.handle(id)
    }

    fn same_node(&self, x: &Handle, y: &Handle) -> bool {
        x.id == y.id
    }

    fn set_quirks_mode(&self, _mode: QuirksMode) {}

    fn append_before_sibling(&self, sibling: &Handle, new_node: NodeOrText<Handle>) {
        let mut nodes = self.nodes.borrow_mut();
        match new_node {
            NodeOrText::AppendNode(h) => {
                detach(&mut nodes, h.id);
                link_before(&mut nodes, sibling.id, h.id);
            }
            NodeOrText::AppendText(t) => {
                let prev = nodes[sibling.id as usize].prev;
                if prev != NONE
                    && let Data::Text(existing) = &mut nodes[prev as usize].data
                {
                    existing.push_tendril(&t);
                    return;
                }
                drop(nodes);
                let id = self.push(Data::Text(t));
                let mut nodes = self.nodes.borrow_mut();
                link_before(&mut nodes, sibling.id, id);
            }
        }
    }

    fn add_attrs_if_missing(&self, target: &Handle, add: Vec<Attribute>) {
        let mut nodes = self.nodes.borrow_mut();
        if let Data::Element { attrs, .. } = &mut nodes[target.id as usize].data {
            for a in add {
                if KEPT_ATTRS.contains(&a.name.local)
                    && !attrs.iter().any(|(k, _)| *k == a.name.local)
                {
                    attrs.push((a.name.local, a.value));
                }
            }
        }
    }

    fn remove_from_parent(&self, target: &Handle) {
        detach(&mut self.nodes.borrow_mut(), target.id);
    }

    fn reparent_children(&self, node: &Handle, new_parent: &Handle) {
        let mut nodes = self.nodes.borrow_mut();
        let mut child = nodes[node.id as usize].first;
        while child != NONE {
            let next = nodes[child as usize].next;
            detach(&mut nodes, child);
            link_last(&mut nodes, new_parent.id, child);
            child = next;
        }
    }
}

/// Input fed to the parser at a time; limits are checked between pieces.
const FEED_BYTES: usize = 16 * 1024;

fn parse(html: &str) -> Dom {
    let sink = Sink {
        nodes: RefCell::new(vec![Node::new(Data::Document)]),
        stop: Cell::new(false),
    };
    let mut parser = parse_document(sink, Default::default());
    let mut rest = html;
    while !rest.is_empty() {
        let mut cut = rest.len().min(FEED_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        parser.process(StrTendril::from_slice(piece));
        rest = tail;
        if parser.tokenizer.sink.sink.stop.get() {
            break;
        }
    }
    parser.finish()
}

// ----------------------------------------------------------- main content

/// DocBook's division classes (the PostgreSQL manual's pages are one each).
const DOCBOOK_DIVISIONS: [&str; 16] = [
    "book",
    "set",
    "part",
    "chapter",
    "appendix",
    "preface",
    "reference",
    "refentry",
    "sect1",
    "section",
    "article",
    "index",
    "glossary",
    "bibliography",
    "colophon",
    "dedication",
];

/// Class tokens of navigation and page furniture.
const FURNITURE_CLASSES: [&str; 22] = [
    "navheader",
    "navfooter",
    "toc",
    "sphinxsidebar",
    "sphinxsidebarwrapper",
    "related",
    "breadcrumb",
    "breadcrumbs",
    "sidebar",
    "navbar",
    "nav",
    "menu",
    "skip-link",
    "skiplink",
    "site-header",
    "site-footer",
    "footer",
    "headerlink",
    "toctree-wrapper",
    "wy-nav-side",
    "rst-versions",
    "sr-only",
];

const FURNITURE_ROLES: [&str; 8] = [
    "navigation",
    "banner",
    "contentinfo",
    "search",
    "complementary",
    "menu",
    "menubar",
    "toolbar",
];

/// Per-node sizes, computed bottom-up: text bytes, of which in links, the
/// number of links, whether a heading is inside.
#[derive(Clone, Copy, Default)]
struct Stats {
    text: u32,
    link_text: u32,
    links: u32,
    heading: bool,
}

fn is_heading(l: &LocalName) -> Option<u8> {
    Some(match *l {
        local_name!("h1") => 1,
        local_name!("h2") => 2,
        local_name!("h3") => 3,
        local_name!("h4") => 4,
        local_name!("h5") => 5,
        local_name!("h6") => 6,
        _ => return None,
    })
}

/// Elements whose content is never text a reader reads.
fn never_text(l: &LocalName) -> bool {
    matches!(
        *l,
        local_name!("script")
            | local_name!("style")
            | local_name!("noscript")
            | local_name!("template")
            | local_name!("svg")
            | local_name!("math")
            | local_name!("iframe")
            | local_name!("object")
            | local_name!("embed")
            | local_name!("canvas")
            | local_name!("button")
            | local_name!("select")
            | local_name!("textarea")
            | local_name!("input")
            | local_name!("form")
            | local_name!("nav")
            | local_name!("aside")
            | local_name!("footer")
            | local_name!("head")
            | local_name!("title")
            | local_name!("meta")
            | local_name!("link")
    )
}

fn stats(dom: &Dom) -> Vec<Stats> {
    let mut out = vec![Stats::default(); dom.nodes.len()];
    // Post-order without recursion: children before their parent.
    let mut stack: Vec<(u32, bool)> = vec![(0, false)];
    while let Some((id, done)) = stack.pop() {
        if !done {
            stack.push((id, true));
            for c in dom.children(id) {
                stack.push((c, false));
            }
            continue;
        }
        let mut s = Stats::default();
        match &dom.nodes[id as usize].data {
            Data::Text(t) => {
                s.text = u32::try_from(t.trim().len()).unwrap_or(u32::MAX);
            }
            Data::Element { name, .. } if never_text(&name.local) => {}
            _ => {
                for c in dom.children(id) {
                    let cs = out[c as usize];
                    s.text = s.text.saturating_add(cs.text);
                    s.link_text = s.link_text.saturating_add(cs.link_text);
                    s.links = s.links.saturating_add(cs.links);
                    s.heading |= cs.heading;
                }
                if let Some(l) = dom.local(id) {
                    if *l == local_name!("a") {
                        s.links = s.links.saturating_add(1);
                        s.link_text = s.text;
                    }
                    s.heading |= is_heading(l).is_some();
                }
            }
        }
        out[id as usize] = s;
    }
    out
}

/// The outermost elements (document order) that `matches`.
fn outermost(dom: &Dom, from: u32, matches: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut found = Vec::new();
    let mut stack = vec![from];
    while let Some(id) = stack.pop() {
        if dom.local(id).is_some() && matches(id) {
            found.push(id);
            continue;
        }
        let children: Vec<u32> = dom.children(id).collect();
        stack.extend(children.into_iter().rev());
    }
    found
}

/// The main content's roots, and whether they were found by the
/// boilerplate heuristic (the `body`) rather than by markup.
fn main_content(dom: &Dom) -> (Vec<u32>, bool) {
    let element = |id: u32, name: LocalName| dom.local(id) == Some(&name);
    let selectors: [&dyn Fn(u32) -> bool; 5] = [
        &|id| element(id, local_name!("main")),
        &|id| dom.attr(id, &local_name!("role")) == Some("main"),
        &|id| element(id, local_name!("article")),
        &|id| element(id, local_name!("div")) && dom.has_class(id, "body"),
        &|id| {
            (element(id, local_name!("div")) || element(id, local_name!("section")))
                && DOCBOOK_DIVISIONS.iter().any(|c| dom.has_class(id, c))
        },
    ];
    for s in selectors {
        let found = outermost(dom, 0, s);
        if !found.is_empty() {
            return (found, false);
        }
    }
    let body = outermost(dom, 0, |id| element(id, local_name!("body")));
    if body.is_empty() {
        (vec![0], true)
    } else {
        (body, true)
    }
}

// ---------------------------------------------------------------- render

struct Out {
    text: String,
    limit: usize,
    full: bool,
    /// 0 none, 1 a line break, 2 a blank line, before the next text.
    brk: u8,
    space: bool,
    /// Just after a cell separator: no space before the next word.
    glue: bool,
    headings: Vec<Heading>,
}

impl Out {
    fn block(&mut self, level: u8) {
        self.brk = self.brk.max(level);
    }

    fn room(&mut self, extra: usize) -> bool {
        if self.full || self.text.len().saturating_add(extra) > self.limit {
            self.full = true;
            return false;
        }
        true
    }

    /// Writes what is pending before a character.
    fn flush(&mut self) {
        if self.text.is_empty() {
            self.brk = 0;
            self.space = false;
            return;
        }
        let sep = match self.brk {
            2 => "\n\n",
            1 => "\n",
            _ if self.space && !self.glue => " ",
            _ => "",
        };
        self.glue = false;
        if !sep.is_empty() && self.room(sep.len()) {
            self.text.push_str(sep);
        }
        self.brk = 0;
        self.space = false;
    }

    /// Text with whitespace collapsed.
    fn inline(&mut self, s: &str) {
        for (i, word) in s.split(char::is_whitespace).enumerate() {
            if i > 0 {
                self.space = true;
            }
            if word.is_empty() {
                continue;
            }
            if self.full {
                return;
            }
            if !self.room(word.len().saturating_add(2)) {
                self.partial(word);
                return;
            }
            self.flush();
            self.text.push_str(word);
            self.space = false;
        }
    }

    /// Preformatted text: lines kept, trailing blanks dropped.
    fn pre(&mut self, s: &str) {
        let mut lines = s.split('\n').peekable();
        let mut first = true;
        while let Some(line) = lines.next() {
            if !first {
                self.block(1);
            }
            first = false;
            // Spaces between inline elements of a line stay; a line's
            // trailing blanks go.
            let line = if lines.peek().is_some() {
                line.trim_end()
            } else {
                line
            };
            if line.is_empty() {
                continue;
            }
            if self.full {
                return;
            }
            if !self.room(line.len().saturating_add(2)) {
                self.partial(line);
                return;
            }
            self.flush();
            self.text.push_str(line);
        }
    }

    /// What fits of a word or line longer than the room left (a page of
    /// one giant word still gives its first part); the text is then full.
    fn partial(&mut self, s: &str) {
        let left = self.limit.saturating_sub(self.text.len().saturating_add(2));
        let mut end = left.min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        if end > 0 {
            self.full = false;
            self.flush();
            self.text.push_str(&s[..end]);
        }
        self.full = true;
    }

    /// A separator written as is (the cell separator).
    fn raw(&mut self, s: &str) {
        if self.room(s.len()) {
            self.space = false;
            self.glue = true;
            self.text.push_str(s);
        }
    }
}

/// How the walk treats an element.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Skip,
    Block(u8),
    Heading(u8),
    Pre,
    Table,
    Row,
    Cell,
    LineBreak,
    Inline,
}

fn kind(dom: &Dom, id: u32, stats: &[Stats], heuristic: bool) -> Kind {
    let Some(l) = dom.local(id) else {
        return Kind::Inline;
    };
    if never_text(l) {
        return Kind::Skip;
    }
    if *l == local_name!("header") && !stats[id as usize].heading {
        return Kind::Skip;
    }
    if dom.attr(id, &local_name!("aria-hidden")) == Some("true")
        || dom.attr(id, &local_name!("hidden")).is_some()
    {
        return Kind::Skip;
    }
    if dom
        .attr(id, &local_name!("role"))
        .is_some_and(|r| FURNITURE_ROLES.contains(&r))
    {
        return Kind::Skip;
    }
    if dom.attr(id, &local_name!("class")).is_some_and(|c| {
        c.split_ascii_whitespace()
            .any(|t| FURNITURE_CLASSES.contains(&t))
    }) {
        return Kind::Skip;
    }
    if *l == local_name!("a") && is_permalink(dom, id, stats) {
        return Kind::Skip;
    }
    if let Some(level) = is_heading(l) {
        return Kind::Heading(level);
    }
    let block = match *l {
        local_name!("pre")
        | local_name!("listing")
        | local_name!("xmp")
        | local_name!("plaintext") => {
            return Kind::Pre;
        }
        local_name!("table") => return Kind::Table,
        local_name!("tr") => return Kind::Row,
        local_name!("td") | local_name!("th") => return Kind::Cell,
        local_name!("br") => return Kind::LineBreak,
        local_name!("li")
        | local_name!("dt")
        | local_name!("dd")
        | local_name!("caption")
        | local_name!("figcaption")
        | local_name!("option") => Kind::Block(1),
        local_name!("p")
        | local_name!("div")
        | local_name!("section")
        | local_name!("article")
        | local_name!("main")
        | local_name!("header")
        | local_name!("blockquote")
        | local_name!("ul")
        | local_name!("ol")
        | local_name!("dl")
        | local_name!("figure")
        | local_name!("hr")
        | local_name!("details")
        | local_name!("summary")
        | local_name!("address")
        | local_name!("fieldset")
        | local_name!("body")
        | local_name!("center") => Kind::Block(2),
        _ => Kind::Inline,
    };
    if heuristic && matches!(block, Kind::Block(_)) && link_dense(&stats[id as usize]) {
        return Kind::Skip;
    }
    block
}

/// Most of a block's text is in links, and it has several: a menu.
fn link_dense(s: &Stats) -> bool {
    s.links >= 3 && s.text > 0 && u64::from(s.link_text) * 10 > u64::from(s.text) * 6
}

/// An anchor that only marks a place: `¶`, `#`, `§`, or classed so.
fn is_permalink(dom: &Dom, id: u32, stats: &[Stats]) -> bool {
    if dom.has_class(id, "headerlink")
        || dom.has_class(id, "anchor")
        || dom.has_class(id, "id_link")
    {
        return true;
    }
    if stats[id as usize].text > 8 {
        return false;
    }
    let mut text = String::new();
    collect_text(dom, id, &mut text, 16);
    matches!(text.trim(), "¶" | "#" | "§" | "🔗" | "⁋")
}

/// The text under `id`, at most `max` bytes of it.
fn collect_text(dom: &Dom, id: u32, out: &mut String, max: usize) {
    let mut stack: Vec<u32> = dom.children(id).collect();
    stack.reverse();
    while let Some(n) = stack.pop() {
        if out.len() >= max {
            return;
        }
        match &dom.nodes[n as usize].data {
            Data::Text(t) => {
                let room = max - out.len();
                let mut end = t.len().min(room);
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                out.push_str(&t[..end]);
            }
            Data::Element { name, .. } if never_text(&name.local) => {}
            _ => {
                let children: Vec<u32> = dom.children(n).collect();
                stack.extend(children.into_iter().rev());
            }
        }
    }
}

/// Whitespace collapsed, at most [`MAX_LABEL_BYTES`].
fn label(s: &str) -> String {
    let mut out = String::new();
    for word in s.split_whitespace() {
        if out.len().saturating_add(word.len()) >= MAX_LABEL_BYTES {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn title(dom: &Dom) -> Option<String> {
    let found = outermost(dom, 0, |id| dom.local(id) == Some(&local_name!("title")));
    let mut text = String::new();
    collect_text(dom, *found.first()?, &mut text, MAX_LABEL_BYTES * 4);
    Some(label(&text)).filter(|t| !t.is_empty())
}

enum Step {
    Enter(u32),
    Exit(u32, Kind, usize),
}

fn render(dom: &Dom, limit: usize) -> Page {
    let stats = stats(dom);
    let (roots, heuristic) = main_content(dom);
    let mut out = Out {
        text: String::new(),
        limit,
        full: false,
        brk: 0,
        space: false,
        glue: false,
        headings: Vec::new(),
    };
    // Depths of the enclosing elements that change how text is written.
    let (mut pre, mut cell, mut heading) = (0usize, 0usize, None::<(u32, u8, usize)>);
    // Cells written in the current row of the outermost table.
    let mut cells_in_row = 0usize;
    let mut stack: Vec<Step> = roots.iter().rev().map(|&r| Step::Enter(r)).collect();
    while let Some(step) = stack.pop() {
        if out.full {
            break;
        }
        match step {
            Step::Enter(id) => {
                if let Data::Text(t) = &dom.nodes[id as usize].data {
                    if pre > 0 {
                        out.pre(t);
                    } else if let Some((h, level, usize::MAX)) = heading
                        && !t.trim().is_empty()
                    {
                        // The heading's text starts here.
                        out.flush();
                        heading = Some((h, level, out.text.len()));
                        out.inline(t.trim_start());
                    } else {
                        out.inline(t);
                    }
                    continue;
                }
                let mark = out.text.len();
                let k = match kind(dom, id, &stats, heuristic) {
                    Kind::Skip => continue,
                    Kind::Block(level) if cell == 0 => {
                        out.block(level);
                        Kind::Block(level)
                    }
                    Kind::Block(_) | Kind::LineBreak | Kind::Heading(_) if cell > 0 => {
                        out.space = true;
                        Kind::Inline
                    }
                    Kind::LineBreak => {
                        out.block(1);
                        Kind::Inline
                    }
                    Kind::Heading(level) if heading.is_none() && pre == 0 => {
                        out.block(2);
                        heading = Some((id, level, usize::MAX));
                        Kind::Heading(level)
                    }
                    Kind::Heading(_) => Kind::Inline,
                    Kind::Pre => {
                        if cell == 0 {
                            out.block(2);
                        }
                        pre += 1;
                        Kind::Pre
                    }
                    Kind::Table | Kind::Row if cell > 0 => Kind::Inline,
                    Kind::Table => {
                        out.block(2);
                        Kind::Table
                    }
                    Kind::Row => {
                        out.block(1);
                        cells_in_row = 0;
                        Kind::Row
                    }
                    Kind::Cell => {
                        if cell == 0 {
                            if cells_in_row > 0 {
                                out.flush();
                                out.raw(" | ");
                            }
                            cells_in_row += 1;
                        } else {
                            out.space = true;
                        }
                        cell += 1;
                        Kind::Cell
                    }
                    other => other,
                };
                stack.push(Step::Exit(id, k, mark));
                let children: Vec<u32> = dom.children(id).collect();
                stack.extend(children.into_iter().rev().map(Step::Enter));
            }
            Step::Exit(id, k, mark) => match k {
                Kind::Block(level) => out.block(level),
                Kind::Heading(_) => {
                    if let Some((h, level, start)) = heading.take()
                        && h == id
                        && start != usize::MAX
                        && start <= out.text.len()
                    {
                        let text = label(&out.text[start..]);
                        if !text.is_empty() {
                            out.headings.push(Heading {
                                offset: start,
                                level,
                                text,
                            });
                        }
                    }
                    out.block(2);
                }
                Kind::Pre => {
                    pre = pre.saturating_sub(1);
                    if cell == 0 {
                        out.block(2);
                    }
                }
                Kind::Table => out.block(2),
                Kind::Row => {
                    // A row with no letter or digit (borders, empty cells)
                    // is not text.
                    if mark <= out.text.len()
                        && !out.text[mark..].chars().any(char::is_alphanumeric)
                    {
                        out.text.truncate(mark);
                    }
                    // Empty last cells leave separators behind.
                    let kept = out.text[mark.min(out.text.len())..]
                        .trim_end_matches([' ', '|'])
                        .len();
                    out.text.truncate(mark.min(out.text.len()) + kept);
                    out.glue = false;
                    out.block(1);
                    cells_in_row = 0;
                }
                Kind::Cell => {
                    cell = cell.saturating_sub(1);
                    if cell > 0 {
                        out.space = true;
                    }
                }
                _ => {}
            },
        }
    }
    // A heading cut off by the limit or truncated away.
    out.headings.retain(|h| h.offset < out.text.len());
    let title = title(dom).or_else(|| out.headings.first().map(|h| h.text.clone()));
    Page {
        title,
        text: out.text,
        headings: out.headings,
        truncated: out.full,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A page of the PostgreSQL 15 manual (tests/fixtures/postgresql-15).
    pub fn pg(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/postgresql-15/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The manual's navigation header and footer as text would show them.
    fn assert_no_nav(text: &str) {
        for nav in ["Prev", "Next", "Up", "Home", "Submit correction"] {
            assert!(
                !text
                    .lines()
                    .any(|l| l.trim() == nav || l.starts_with(&format!("{nav} |"))),
                "navigation {nav:?} in the text"
            );
        }
        for nav in [
            "Prev Up",
            "Home Next",
            "Prev | Up",
            "If you see anything in the documentation",
        ] {
            assert!(!text.contains(nav), "navigation {nav:?} in the text");
        }
    }

    #[test]
    fn a_section_page_is_its_content_with_title_and_headings() {
        let html = pg("ddl-basics.html");
        let page = extract(&html);
        assert_eq!(page.title.as_deref(), Some("5.1. Table Basics"));
        assert!(!page.truncated);
        assert_eq!(
            page.headings.first().map(|h| (h.level, h.text.as_str())),
            Some((2, "5.1. Table Basics"))
        );
        assert!(
            page.text.starts_with("5.1. Table Basics\n\n"),
            "the content starts with its heading, not the navigation: {:?}",
            &page.text[..200.min(page.text.len())]
        );
        assert!(
            page.text
                .contains("A table in a relational database is much like a table on paper")
        );
        assert_no_nav(&page.text);
        assert!(
            !page.text.contains("Chapter 5. Data Definition"),
            "the header's chapter line"
        );
        assert!(
            !page.text.contains("5.2. Default Values"),
            "the footer's next link"
        );
        for h in &page.headings {
            assert!(page.text[h.offset..].starts_with(&h.text), "{h:?}");
        }
        // SQL examples keep their lines.
        assert!(
            page.text
                .contains("CREATE TABLE my_first_table (\n    first_column text,"),
            "{}",
            page.text
        );
        assert!(!page.text.contains("  \n") && !page.text.contains("\n\n\n"));
    }

    #[test]
    fn a_reference_page_has_its_sections_as_headings() {
        let page = extract(&pg("sql-createindex.html"));
        assert_eq!(page.title.as_deref(), Some("CREATE INDEX"));
        let headings: Vec<(u8, &str)> = page
            .headings
            .iter()
            .map(|h| (h.level, h.text.as_str()))
            .collect();
        for want in [
            "Synopsis",
            "Description",
            "Parameters",
            "Notes",
            "Examples",
            "See Also",
        ] {
            assert!(
                headings.iter().any(|(_, t)| *t == want),
                "{want} in {headings:?}"
            );
        }
        assert!(!page.text.contains('¶'));
        assert_no_nav(&page.text);
    }

    #[test]
    fn a_catalog_table_is_rows_of_cell_text() {
        let page = extract(&pg("catalog-pg-class.html"));
        assert_eq!(page.title.as_deref(), Some("53.11. pg_class"));
        // One row per line: the column, its type, its description.
        let row = page
            .text
            .lines()
            .find(|l| l.starts_with("relname name"))
            .expect("the relname row");
        assert!(
            row.contains("Name of the table, index, view, etc."),
            "{row:?}"
        );
        for line in page.text.lines().filter(|l| !l.is_empty()) {
            assert_eq!(line, line.trim(), "no padding");
            assert!(!line.contains("  "), "no padding: {line:?}");
            assert!(
                line.chars().any(char::is_alphanumeric),
                "no border line: {line:?}"
            );
        }
    }

    #[test]
    fn cells_are_separated_and_empty_rows_dropped() {
        let page = extract(
            "<table><tr><th>Name</th><th>Type</th></tr>\
             <tr><td><p>oid</p><p>row id</p></td><td>  oid  </td></tr>\
             <tr><td> </td><td>---</td></tr>\
             <tr><td><a href=\"x.html\">relname</a></td><td><table><tr><td>in</td><td>ner</td></tr></table></td></tr></table>",
        );
        assert_eq!(page.text, "Name | Type\noid row id | oid\nrelname | in ner");
    }

    #[test]
    fn a_chapter_page_loses_its_table_of_contents() {
        let html = pg("ddl.html");
        let page = extract(&html);
        assert_eq!(page.title.as_deref(), Some("Chapter 5. Data Definition"));
        assert!(
            page.text
                .contains("This chapter covers how one creates the database structures")
        );
        assert!(
            !page.text.contains("5.1. Table Basics"),
            "the toc: {}",
            page.text
        );
        assert!(page.text.len() < 2000, "{}", page.text.len());
    }

    #[test]
    fn the_generated_index_stays_small() {
        let html = pg("bookindex.html");
        let page = extract(&html);
        assert_eq!(page.title.as_deref(), Some("Index"));
        assert!(
            page.text.len() < html.len() / 2,
            "{} of {}",
            page.text.len(),
            html.len()
        );
        assert!(page.text.contains("ABORT"));
        assert!(!page.truncated);
    }

    #[test]
    fn without_main_markup_menus_and_furniture_go() {
        let page = extract(
            "<html><head><title> My   page </title><style>p{}</style></head><body>\
             <header><a href=/>Home</a> <a href=/a>About</a></header>\
             <div class=menu-x><ul><li><a href=/1>One</a></li><li><a href=/2>Two</a></li>\
             <li><a href=/3>Three</a></li></ul></div>\
             <h1>Welcome<a class=headerlink href=#w>¶</a></h1>\
             <p>Read <a href=/doc>the guide</a> first.</p><h2>Then <a href=#t>#</a></h2>\
             <p>Go on.<script>alert(1)</script></p><form><input value=search></form>\
             <footer>© me</footer></body></html>",
        );
        assert_eq!(page.title.as_deref(), Some("My page"));
        assert_eq!(
            page.text,
            "Welcome\n\nRead the guide first.\n\nThen\n\nGo on."
        );
        let headings: Vec<_> = page
            .headings
            .iter()
            .map(|h| (h.offset, h.level, h.text.as_str()))
            .collect();
        assert_eq!(headings, [(0, 1, "Welcome"), (32, 2, "Then")]);
    }

    #[test]
    fn main_wins_over_the_rest() {
        let page = extract(
            "<body><nav>Menu</nav><div class=sidebar>Side</div>\
             <main><h1>Doc</h1><p>Text</p></main><div>Footer-ish</div></body>",
        );
        assert_eq!(page.text, "Doc\n\nText");
        assert_eq!(
            page.title.as_deref(),
            Some("Doc"),
            "the first heading without <title>"
        );
    }

    #[test]
    fn deep_nesting_stops_the_parse_not_the_worker() {
        let depth = 200_000;
        let html = format!(
            "{}deep text{}",
            "<div>".repeat(depth),
            "</div>".repeat(depth)
        );
        let t0 = std::time::Instant::now();
        let page = extract(&html);
        assert!(page.truncated);
        assert!(page.text.len() <= html.len() + SLACK);
        assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
        // Nested inline formatting too.
        let html = "<b><i>x".repeat(100_000);
        let page = extract(&html);
        assert!(page.text.len() <= html.len() + SLACK);
    }

    #[test]
    fn a_huge_table_is_bounded_by_its_input() {
        let row = "<tr><td>k</td><td>v</td><td></td></tr>";
        let html = format!("<table>{}</table>", row.repeat(5 * 1024 * 1024 / row.len()));
        let page = extract(&html);
        assert!(page.text.len() <= html.len() + SLACK, "{}", page.text.len());
        assert!(
            page.text.starts_with("k | v\nk | v\n"),
            "{:?}",
            &page.text[..40]
        );
        // Separators only: bounded too.
        let html = "<tr><td>".repeat(1_000_000);
        assert!(extract(&html).text.len() <= html.len() + SLACK);
    }

    #[test]
    fn only_box_drawing_is_kept_as_text_for_the_chunker_to_drop() {
        let page = extract("<pre>┌──┐\n│  │\n└──┘</pre>");
        assert_eq!(page.text, "┌──┐\n│  │\n└──┘");
    }

    #[test]
    fn labels_are_collapsed_and_bounded() {
        assert_eq!(label("  a \n b  "), "a b");
        assert!(label(&"word ".repeat(1000)).len() < MAX_LABEL_BYTES);
    }
}
