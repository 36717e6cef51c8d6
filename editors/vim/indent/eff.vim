" effc pipeline files: indent after a line that ends in ':' (a stage header); inside an
" open bracket, line up with the first argument after it; after the line that closes it,
" go back to the indent of the statement; otherwise keep the indent.
if exists("b:did_indent")
  finish
endif
let b:did_indent = 1

setlocal autoindent
setlocal indentexpr=EffIndent(v:lnum)
setlocal indentkeys=o,O,!^F
let b:undo_indent = "setlocal autoindent< indentexpr< indentkeys<"

if exists("*EffIndent")
  finish
endif

" The code of a line: its comment and the contents of its strings removed.
function! s:Code(line) abort
  return substitute(substitute(a:line, '"\%([^"\\]\|\\.\)*"', '""', 'g'), '#.*$', '', '')
endfunction

function! EffIndent(lnum) abort
  let prev = prevnonblank(a:lnum - 1)
  while prev > 0 && getline(prev) =~# '^\s*#'
    let prev = prevnonblank(prev - 1)
  endwhile
  if prev == 0
    return 0
  endif
  let code = s:Code(getline(prev))
  " The last bracket left open on the previous line.
  let depth = 0
  let open = -1
  for i in range(len(code) - 1, 0, -1)
    if code[i] =~# '[)\]}]'
      let depth += 1
    elseif code[i] =~# '[(\[{]'
      if depth == 0
        let open = i
        break
      endif
      let depth -= 1
    endif
  endfor
  if open >= 0
    let after = matchstr(code, '^\s*', open + 1)
    return code[open + 1 :] =~# '^\s*$' ? indent(prev) + shiftwidth() : open + 1 + len(after)
  endif
  if code =~# ':\s*$'
    return indent(prev) + shiftwidth()
  endif
  " A line that closes brackets opened above: back to the line that opened them.
  let start = prev
  let balance = s:Balance(code)
  while balance < 0 && start > 1
    let start = prevnonblank(start - 1)
    let balance += s:Balance(s:Code(getline(start)))
  endwhile
  return indent(start)
endfunction

" Opening minus closing brackets in `code`.
function! s:Balance(code) abort
  return len(substitute(a:code, '[^(\[{]', '', 'g')) - len(substitute(a:code, '[^)\]}]', '', 'g'))
endfunction
