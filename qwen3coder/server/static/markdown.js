// A tiny Markdown renderer for chat replies: fenced code blocks (with language label and copy
// button), inline code, bold, italic, headings, lists, block quotes, links and paragraphs.
// Everything is HTML-escaped first; only the tags produced here reach the page.
"use strict";

(function (global) {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(text) {
    // text is raw; split out inline code first so its content is not formatted
    const parts = text.split(/(`+[^`]*?`+)/g);
    return parts.map(function (part) {
      const m = /^(`+)([^`]*?)\1$/.exec(part);
      if (m) return "<code>" + escapeHtml(m[2]) + "</code>";
      let s = escapeHtml(part);
      s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, function (_, label, url) {
        return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
      });
      s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
      s = s.replace(/(^|[^*\w])\*([^*\s][^*]*?)\*(?!\w)/g, "$1<em>$2</em>");
      s = s.replace(/(^|[^_\w])_([^_\s][^_]*?)_(?!\w)/g, "$1<em>$2</em>");
      return s;
    }).join("");
  }

  function codeBlock(lang, code, open) {
    const label = lang ? escapeHtml(lang) : "code";
    return '<div class="code"><div class="code-head"><span>' + label + "</span>" +
      '<button type="button" class="copy">copy</button></div><pre><code' +
      (lang ? ' class="lang-' + escapeHtml(lang) + '"' : "") + ">" + escapeHtml(code) +
      (open ? '<span class="cursor"></span>' : "") + "</code></pre></div>";
  }

  // Render markdown; `streaming` marks an unterminated trailing code fence as still open.
  function render(src, streaming) {
    const lines = src.replace(/\r\n/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null; // {type: "ul"|"ol", items: []}

    function flushPara() {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    }
    function flushList() {
      if (list) {
        out.push("<" + list.type + ">" + list.items.map(function (i) { return "<li>" + inline(i) + "</li>"; }).join("") +
          "</" + list.type + ">");
      }
      list = null;
    }

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/.exec(line);
      if (fence) {
        flushPara(); flushList();
        const marker = fence[1];
        const body = [];
        let closed = false;
        for (i = i + 1; i < lines.length; i++) {
          if (lines[i].trim().startsWith(marker) && lines[i].trim().replace(/[`~]/g, "") === "") { closed = true; break; }
          body.push(lines[i]);
        }
        out.push(codeBlock(fence[2], body.join("\n"), !closed && streaming));
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        flushPara(); flushList();
        const level = Math.min(heading[1].length + 2, 6);
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
        continue;
      }
      const item = /^\s*([-*+]|\d+[.)])\s+(.*)$/.exec(line);
      if (item) {
        flushPara();
        const type = /\d/.test(item[1]) ? "ol" : "ul";
        if (!list || list.type !== type) { flushList(); list = {type: type, items: []}; }
        list.items.push(item[2]);
        continue;
      }
      const quote = /^>\s?(.*)$/.exec(line);
      if (quote) {
        flushPara(); flushList();
        out.push("<blockquote>" + inline(quote[1]) + "</blockquote>");
        continue;
      }
      if (!line.trim()) { flushPara(); flushList(); continue; }
      if (list && /^\s{2,}\S/.test(line)) { list.items[list.items.length - 1] += " " + line.trim(); continue; }
      flushList();
      para.push(line);
    }
    flushPara(); flushList();
    return out.join("\n");
  }

  global.Markdown = {render: render, escapeHtml: escapeHtml};
})(window);
