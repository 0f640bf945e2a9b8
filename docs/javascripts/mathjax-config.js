// MathJax configuration for pymdownx.arithmatex (generic mode), as recommended by
// mkdocs-material. It must run BEFORE mathjax/tex-svg-full.js (the vendored MathJax
// 3.2.2, see mathjax/NOTICE), so mkdocs.yml lists it first in extra_javascript.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// mkdocs-material's document$ emits on every page load, including each page swapped in
// by instant navigation (which does not re-run the scripts): typeset the new content
// each time, once MathJax's startup is done. On the first load the formulas are already
// typeset by then and are not found twice. Guards keep this inert without document$.
if (typeof document$ !== "undefined") {
  document$.subscribe(function () {
    var mj = window.MathJax;
    if (!mj || !mj.startup || !mj.startup.promise) {
      return;
    }
    mj.startup.promise.then(function () {
      var output = mj.startup.output;
      // SVG output (the vendored component) has clearFontCache; CHTML has clearCache.
      if (typeof output.clearFontCache === "function") {
        output.clearFontCache();
      } else if (typeof output.clearCache === "function") {
        output.clearCache();
      }
      mj.typesetClear();
      mj.texReset();
      return mj.typesetPromise();
    });
  });
}
