;;; lacuna.el --- Code suggestions from Lacuna through Eglot  -*- lexical-binding: t; -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1") (eglot "1.9"))
;; Keywords: languages, tools, completion

;;; Commentary:

;; Lacuna is a local code-completion language server (`lacuna serve') built on a
;; masked-diffusion model.  Loading this file registers it with Eglot for Python,
;; JavaScript, TypeScript, Go, Rust, C, C++ and Java buffers; `M-x eglot' (or
;; `eglot-ensure' in a mode hook) starts it.  Its suggestions are completion
;; candidates, offered by `completion-at-point' (and Company or Corfu on top).
;;
;; Eglot runs one language server per buffer: in these modes Lacuna takes the
;; place of the language server Eglot would otherwise start.

;;; Code:

(require 'eglot)
(require 'jsonrpc)

(defgroup lacuna nil
  "Code suggestions from the Lacuna language server."
  :group 'tools
  :prefix "lacuna-")

(defcustom lacuna-server-command '("lacuna" "serve")
  "The command that starts the Lacuna language server, and its arguments."
  :type '(repeat string))

(defcustom lacuna-settings '(:maxTokens 64 :candidates 1)
  "The server's options: a plist of camelCase names, sent as initializationOptions.
For example :maxTokens, :candidates, :multiline, :modelDir, :device,
:engineUrl, :enabledLanguages (a vector of strings), :timeBudgetMs."
  :type 'plist)

(defconst lacuna-modes
  '(python-mode python-ts-mode js-mode js-ts-mode typescript-mode typescript-ts-mode
    tsx-ts-mode go-mode go-ts-mode rust-mode rust-ts-mode c-mode c-ts-mode c++-mode
    c++-ts-mode java-mode java-ts-mode)
  "The major modes Eglot starts Lacuna in.")

(defun lacuna--contact (_interactive)
  "The Eglot contact for Lacuna, read from the options when Eglot starts it."
  (append lacuna-server-command
          (list :initializationOptions (lambda (_server) lacuna-settings))))

(add-to-list 'eglot-server-programs (cons lacuna-modes #'lacuna--contact))

(defun lacuna-status ()
  "Show the Lacuna server's model, device, last latency and acceptances."
  (interactive)
  (let* ((server (or (eglot-current-server)
                     (user-error "Lacuna: no server in this buffer (M-x eglot)")))
         (status (jsonrpc-request server :workspace/executeCommand
                                  '(:command "lacuna.status" :arguments []))))
    (message "Lacuna: %s, model %s, device %s, last latency %s ms, accepted %s"
             (plist-get status :server)
             (or (plist-get status :model) "loading")
             (or (plist-get status :device) "-")
             (let ((ms (plist-get status :lastLatencyMs))) (if ms (round ms) "-"))
             (plist-get status :accepted))))

(provide 'lacuna)
;;; lacuna.el ends here
