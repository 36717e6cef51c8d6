// Tokenizes files with a TextMate grammar, using the engine VS Code itself uses
// (vscode-textmate on the Oniguruma regex library compiled to WebAssembly).
//
//   node tokenize.js GRAMMAR.json FILE...
//
// Prints one JSON object: {"FILE": [[{"line", "col", "text", "scopes"}, ...], ...]}: for
// each file, for each line (1-based line and column), its tokens and their scope stacks.
// One process for every file: loading the WebAssembly dominates the time of a small file.
"use strict";

const fs = require("fs");
const path = require("path");
const vsctm = require("vscode-textmate");
const oniguruma = require("vscode-oniguruma");

async function main() {
  const [grammarPath, ...files] = process.argv.slice(2);
  if (!grammarPath || files.length === 0) {
    console.error("usage: node tokenize.js GRAMMAR.json FILE...");
    process.exit(2);
  }
  const wasm = fs.readFileSync(path.join(path.dirname(require.resolve("vscode-oniguruma")), "onig.wasm"));
  await oniguruma.loadWASM(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength));
  const rawGrammar = vsctm.parseRawGrammar(fs.readFileSync(grammarPath, "utf8"), grammarPath);
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (sources) => new oniguruma.OnigScanner(sources),
      createOnigString: (s) => new oniguruma.OnigString(s),
    }),
    loadGrammar: async (scopeName) => (scopeName === rawGrammar.scopeName ? rawGrammar : null),
  });
  const grammar = await registry.loadGrammar(rawGrammar.scopeName);
  const out = {};
  for (const file of files) {
    const lines = fs.readFileSync(file, "utf8").replace(/\r\n?/g, "\n").replace(/\n$/, "").split("\n");
    let state = vsctm.INITIAL;
    out[file] = lines.map((text, i) => {
      const result = grammar.tokenizeLine(text, state);
      state = result.ruleStack;
      return result.tokens.map((t) => ({
        line: i + 1,
        col: t.startIndex + 1,
        text: text.slice(t.startIndex, t.endIndex),
        scopes: t.scopes,
      }));
    });
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
