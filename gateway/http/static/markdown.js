// A small, safe Markdown renderer for model answers: it builds DOM nodes (never innerHTML), so model text
// cannot inject markup or script. Covers what chat answers use: headings, paragraphs, lists, block quotes,
// fenced code, inline code, bold, italic, links (http, https and relative only) and line breaks.
"use strict";

(function (global) {
  // http(s), or a path on this origin: not "//host" (protocol-relative), and no backslash anywhere (browsers read
  // "/\host" as "//host").
  const SAFE_URL = /^(https?:\/\/|\/(?!\/)|\.\/|#)[^\\]*$/i;

  function el(tag, children, attrs) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children || []) node.append(child);
    return node;
  }

  // Inline spans: `code`, **bold**, *italic* / _italic_, [text](url). Returns an array of nodes/strings.
  function inline(text, marks) {
    const out = [];
    const pattern = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w*])\*(?=\S)([^*]*?\S)\*(?![\w*])|(?<!\w)_(?=\S)([^_]*?\S)_(?!\w)|\[([^\]]+)\]\(([^)\s]+)\)/g;
    let last = 0;
    for (const m of text.matchAll(pattern)) {
      if (m.index > last) out.push(...plain(text.slice(last, m.index), marks));
      if (m[1]) out.push(el("code", [m[2]]));
      else if (m[3] !== undefined) out.push(el("strong", inline(m[3], marks)));
      else if (m[4] !== undefined) out.push(el("em", inline(m[4], marks)));
      else if (m[5] !== undefined) out.push(el("em", inline(m[5], marks)));
      else if (SAFE_URL.test(m[7])) out.push(el("a", inline(m[6], marks), { href: m[7], rel: "noopener noreferrer", target: "_blank" }));
      else out.push(...plain(m[0], marks));
      last = m.index + m[0].length;
    }
    if (last < text.length) out.push(...plain(text.slice(last), marks));
    return out;
  }

  // Plain text, with the caller's marker characters (e.g. "connection lost") turned into their elements.
  function plain(text, marks) {
    if (!marks) return [text];
    const out = [];
    let buf = "";
    for (const ch of text) {
      if (marks[ch]) { if (buf) out.push(buf); buf = ""; out.push(marks[ch]()); } else buf += ch;
    }
    if (buf) out.push(buf);
    return out;
  }

  function withBreaks(lines, marks) {
    const out = [];
    lines.forEach((line, i) => { if (i) out.push(el("br")); out.push(...inline(line, marks)); });
    return out;
  }

  // Block quotes nest this deep at most; deeper ">" stay text (20,000 of them overflowed the stack).
  const MAX_QUOTE_DEPTH = 16;

  // Block structure, line by line. An unclosed code fence (the answer is still streaming) runs to the end.
  function render(source, marks, depth) {
    depth = depth || 0;
    const root = document.createDocumentFragment();
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)\s*$/);
      if (fence) {
        const body = [];
        i += 1;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        i += 1;
        const code = el("code", plain(body.join("\n"), marks));
        if (fence[2]) code.className = "language-" + fence[2];
        root.append(el("pre", [code]));
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        root.append(el("h" + Math.min(heading[1].length + 2, 6), inline(heading[2], marks)));
        i += 1;
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { root.append(el("hr")); i += 1; continue; }
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+/);
      if (item) {
        const ordered = /\d/.test(item[1]);
        const list = el(ordered ? "ol" : "ul");
        while (i < lines.length) {
          const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
          if (!m || /\d/.test(m[1]) !== ordered) break;
          const parts = [m[2]];
          i += 1;
          // Continuation lines of the same item: indented, not a new item.
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) {
            parts.push(lines[i].trim());
            i += 1;
          }
          list.append(el("li", withBreaks(parts, marks)));
        }
        root.append(list);
        continue;
      }
      if (/^\s*>/.test(line)) {
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
        const inner = depth < MAX_QUOTE_DEPTH ? render(quoted.join("\n"), marks, depth + 1) : el("p", withBreaks(quoted, marks));
        root.append(el("blockquote", [inner]));
        continue;
      }
      if (!line.trim()) { i += 1; continue; }
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^(\s*(```|~~~)|#{1,6}\s|\s*([-*+]|\d+[.)])\s+|\s*>)/.test(lines[i])) {
        para.push(lines[i++]);
      }
      if (!para.length) para.push(lines[i++]);
      root.append(el("p", withBreaks(para, marks)));
    }
    return root;
  }

  global.renderMarkdown = render;
})(window);
